"""OfdClient against the real mock OFD and against small servers that answer garbage.

Whatever the OFD answers, the client either returns one well-typed result per receipt, in order, or raises
UpstreamUnavailable with a stable reason: garbage is never taken as an acknowledgement.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import traceback
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import datetime
from typing import Any, Protocol

import msgspec
import pytest
from aiohttp import web

from kktd.delivery import UpstreamUnavailable
from kktd.upstreams.http import invalid_field
from kktd.upstreams.kktd_ofd import OfdAck, OfdClient, OfdItem, OfdRejection
from kktd_mocks.ofd import MockOfd

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
ACCEPTED_AT = "2026-11-24T03:00:00.000Z"


def receipt(pos_id: str = "POS-1", amount: int = 12345) -> dict[str, Any]:
    return {
        "pos_id": pos_id,
        "operation": "sale",
        "taxation": "osn",
        "items": [
            {
                "name": "Кефир",
                "price": amount,
                "quantity": "1.000",
                "sum": amount,
                "vat": "vat20",
                "payment_method": "full_payment",
                "payment_object": "commodity",
            }
        ],
        "payments": [{"type": "cash", "amount": amount}],
        "total": amount,
    }


def item(n: int, **kwargs: Any) -> OfdItem:
    return OfdItem(f"rcpt-{n}", f"key-{n}", ACCEPTED_AT, receipt(**kwargs))


def ack_for(entry: dict[str, Any], number: int) -> dict[str, Any]:
    return {
        "receipt_id": entry["receipt_id"],
        "fiscal_document_number": number,
        "fiscal_sign": "0123456789",
        "ofd_received_at": "2026-11-24T03:00:01.000Z",
    }


@pytest.fixture
async def client(mock_ofd: MockOfd) -> AsyncIterator[OfdClient]:
    ofd_client = OfdClient(mock_ofd.url, timeout_s=5.0)
    await ofd_client.start()
    try:
        yield ofd_client
    finally:
        await ofd_client.close()


class FakeOfd:
    """A throwaway HTTP server on an ephemeral port answering with `handler`; records what it got."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.bodies: list[Any] = []
        self.peers: set[Any] = set()
        self.request_seen = asyncio.Event()
        self.release = asyncio.Event()  # handlers that hang wait on this; set at teardown
        self._runner: web.AppRunner | None = None
        self.url = ""

    async def _dispatch(self, request: web.Request) -> web.StreamResponse:
        self.peers.add(request.transport.get_extra_info("peername") if request.transport else None)
        self.bodies.append(json.loads(await request.read()))
        self.request_seen.set()
        return await self.handler(request)

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post("/v1/receipts", self._dispatch)
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = self._runner.addresses[0][1]
        self.url = f"http://127.0.0.1:{port}"

    async def close(self) -> None:
        self.release.set()
        if self._runner is not None:
            await self._runner.cleanup()


class FakeOfdFactory(Protocol):
    async def __call__(self, handler: Handler) -> FakeOfd: ...


@pytest.fixture
async def fake_ofd() -> AsyncIterator[FakeOfdFactory]:
    servers: list[FakeOfd] = []

    async def make(handler: Handler) -> FakeOfd:
        server = FakeOfd(handler)
        servers.append(server)
        await server.start()
        return server

    try:
        yield make
    finally:
        for server in servers:
            await server.close()


async def send_to(url: str, items: list[OfdItem], timeout_s: float = 5.0) -> list[Any]:
    async with OfdClient(url, timeout_s) as ofd_client:
        return await ofd_client.send_batch(items)


async def reason_from(url: str, items: list[OfdItem] | None = None, timeout_s: float = 5.0) -> str:
    with pytest.raises(UpstreamUnavailable) as info:
        await send_to(url, items or [item(1), item(2)], timeout_s)
    return info.value.reason


# --- against the real mock ----------------------------------------------------------------------------


async def test_acknowledgements_are_typed_and_in_order(client: OfdClient) -> None:
    results = await client.send_batch([item(n) for n in range(5)])
    assert [r.receipt_id for r in results] == [f"rcpt-{n}" for n in range(5)]
    assert all(isinstance(r, OfdAck) for r in results)
    acks = [r for r in results if isinstance(r, OfdAck)]
    assert [a.fiscal_document_number for a in acks] == [1, 2, 3, 4, 5]
    for ack in acks:
        assert len(ack.fiscal_sign) == 10 and ack.fiscal_sign.isdigit()
        assert datetime.fromisoformat(ack.ofd_received_at).tzinfo is not None


async def test_redelivery_returns_the_same_acknowledgement(client: OfdClient, mock_ofd: MockOfd) -> None:
    first = await client.send_batch([item(1), item(2)])
    again = await client.send_batch([item(2), item(1)])
    assert again == [first[1], first[0]]
    assert mock_ofd.stats()["unique"] == 2
    assert mock_ofd.stats()["redeliveries"] == 2


async def test_rejections_come_back_in_place(client: OfdClient, mock_ofd: MockOfd) -> None:
    mock_ofd.set_rejected_pos_ids(["POS-BAD"])
    results = await client.send_batch([item(1), item(2, pos_id="POS-BAD"), item(3)])
    assert isinstance(results[0], OfdAck) and isinstance(results[2], OfdAck)
    rejection = results[1]
    assert isinstance(rejection, OfdRejection)
    assert (rejection.receipt_id, rejection.code) == ("rcpt-2", "kkt_not_registered")
    assert "POS-BAD" in rejection.message


async def test_pre_encoded_receipt_is_sent_verbatim(client: OfdClient, mock_ofd: MockOfd) -> None:
    canonical = json.dumps(receipt(amount=777), ensure_ascii=False, sort_keys=True, separators=(",", ":"))
    results = await client.send_batch([OfdItem("rcpt-j", "key-j", ACCEPTED_AT, receipt_json=canonical)])
    assert isinstance(results[0], OfdAck)
    stored = mock_ofd.stored("rcpt-j")
    assert stored is not None
    assert stored["receipt"] == receipt(amount=777)
    assert stored["idempotency_key"] == "key-j" and stored["accepted_at"] == ACCEPTED_AT


async def test_full_batch_of_100(client: OfdClient, mock_ofd: MockOfd) -> None:
    results = await client.send_batch([item(n) for n in range(100)])
    assert len(results) == 100 and all(isinstance(r, OfdAck) for r in results)
    assert mock_ofd.stats()["unique"] == 100


async def test_offline_mock_is_a_connect_error(client: OfdClient, mock_ofd: MockOfd) -> None:
    await mock_ofd.set_mode("offline")
    with pytest.raises(UpstreamUnavailable) as info:
        await client.send_batch([item(1)])
    # The first attempt may still pick the pooled connection the mock has just closed.
    assert info.value.reason in ("connect_error", "connection_lost")
    with pytest.raises(UpstreamUnavailable) as info:
        await client.send_batch([item(1)])
    assert info.value.reason == "connect_error"
    await mock_ofd.set_mode("online")
    assert isinstance((await client.send_batch([item(1)]))[0], OfdAck)


async def test_lost_acknowledgement_is_unavailable_then_deduplicated(client: OfdClient, mock_ofd: MockOfd) -> None:
    await mock_ofd.set_mode("drop_ack")
    with pytest.raises(UpstreamUnavailable) as info:
        await client.send_batch([item(1)])
    assert info.value.reason == "connection_lost"
    assert mock_ofd.stats()["unique"] == 1
    await mock_ofd.set_mode("online")
    (ack,) = await client.send_batch([item(1)])
    assert isinstance(ack, OfdAck) and ack.fiscal_document_number == 1
    assert mock_ofd.stats()["redeliveries"] == 1


async def test_error500_mode_is_http_500(client: OfdClient, mock_ofd: MockOfd) -> None:
    await mock_ofd.set_mode("error500")
    with pytest.raises(UpstreamUnavailable) as info:
        await client.send_batch([item(1)])
    assert info.value.reason == "http_500"
    assert mock_ofd.stats()["unique"] == 0


async def test_slow_mock_past_timeout_is_a_timeout(mock_ofd: MockOfd) -> None:
    await mock_ofd.set_mode("slow", delay_s=1.0)
    assert await reason_from(mock_ofd.url, timeout_s=0.2) == "timeout"


# --- against garbage ----------------------------------------------------------------------------------


def answer(status: int = 200, body: bytes | str = b"", content_type: str = "application/json") -> Handler:
    async def handler(request: web.Request) -> web.StreamResponse:
        return web.Response(
            status=status, body=body.encode() if isinstance(body, str) else body, content_type=content_type
        )

    return handler


def results_of(make: Callable[[list[dict[str, Any]]], Any]) -> Handler:
    """A server answering 200 JSON built from the batch it received."""

    async def handler(request: web.Request) -> web.StreamResponse:
        entries = json.loads(await request.read())
        return web.json_response(make(entries))

    return handler


def acks_with(**override: Any) -> Handler:
    return results_of(lambda entries: {"results": [{**ack_for(e, n + 1), **override} for n, e in enumerate(entries)]})


GARBAGE: dict[str, tuple[Handler, str]] = {
    "html page": (answer(200, "<html><body>OK</body></html>", "text/html"), "bad_answer: content_type"),
    "json type, not json": (answer(200, "OK, thanks"), "bad_answer: not_json"),
    "invalid utf-8": (answer(200, b'{"results": ["\xff"]}'), "bad_answer: not_json"),
    "empty body": (answer(200, ""), "bad_answer: not_json"),
    "bare list": (results_of(lambda entries: [ack_for(e, 1) for e in entries]), "bad_answer: shape"),
    "results not a list": (answer(200, '{"results": {"0": 1}}'), "bad_answer: shape"),
    "no results": (answer(200, '{"status": "ok"}'), "bad_answer: shape"),
    "result not an object": (results_of(lambda entries: {"results": ["ok"] * len(entries)}), "bad_answer: shape"),
    "too few results": (
        results_of(lambda entries: {"results": [ack_for(entries[0], 1)]}),
        "bad_answer: length_mismatch",
    ),
    "too many results": (
        results_of(lambda entries: {"results": [ack_for(e, 1) for e in entries * 2]}),
        "bad_answer: length_mismatch",
    ),
    "swapped order": (
        results_of(lambda entries: {"results": [ack_for(e, 1) for e in reversed(entries)]}),
        "bad_answer: receipt_id_mismatch",
    ),
    "unknown id": (
        results_of(lambda entries: {"results": [{**ack_for(e, 1), "receipt_id": "someone-else"} for e in entries]}),
        "bad_answer: receipt_id_mismatch",
    ),
    "number as string": (acks_with(fiscal_document_number="1"), "bad_answer: invalid_ack"),
    "number as bool": (acks_with(fiscal_document_number=True), "bad_answer: invalid_ack"),
    "number as float": (acks_with(fiscal_document_number=1.0), "bad_answer: invalid_ack"),
    "number zero": (acks_with(fiscal_document_number=0), "bad_answer: invalid_ack"),
    "sign missing": (acks_with(fiscal_sign=None), "bad_answer: invalid_ack"),
    "sign empty": (acks_with(fiscal_sign=""), "bad_answer: invalid_ack"),
    "sign as number": (acks_with(fiscal_sign=123), "bad_answer: invalid_ack"),
    "time not a date": (acks_with(ofd_received_at="yesterday"), "bad_answer: invalid_ack"),
    "time without zone": (acks_with(ofd_received_at="2026-11-24T03:00:01"), "bad_answer: invalid_ack"),
    "date only": (acks_with(ofd_received_at="2026-11-24"), "bad_answer: invalid_ack"),
    "fn number not digits": (acks_with(fn_number="99990789X0004312"), "bad_answer: invalid_ack"),
    "fn number as number": (acks_with(fn_number=9999078900004312), "bad_answer: invalid_ack"),
    "fn number too long": (acks_with(fn_number="9" * 33), "bad_answer: invalid_ack"),
    "registration number empty": (acks_with(kkt_registration_number=""), "bad_answer: invalid_ack"),
    "shift negative": (acks_with(shift_number=-1), "bad_answer: invalid_ack"),
    "receipt number as string": (acks_with(receipt_number="1"), "bad_answer: invalid_ack"),
    "empty result object": (
        results_of(lambda entries: {"results": [{"receipt_id": e["receipt_id"]} for e in entries]}),
        "bad_answer: invalid_ack",
    ),
    "error not an object": (
        results_of(lambda entries: {"results": [{"receipt_id": e["receipt_id"], "error": "nope"} for e in entries]}),
        "bad_answer: invalid_rejection",
    ),
    "error without code": (
        results_of(
            lambda entries: {"results": [{"receipt_id": e["receipt_id"], "error": {"message": "x"}} for e in entries]}
        ),
        "bad_answer: invalid_rejection",
    ),
    "error without message": (
        results_of(
            lambda entries: {"results": [{"receipt_id": e["receipt_id"], "error": {"code": "x"}} for e in entries]}
        ),
        "bad_answer: invalid_rejection",
    ),
    "ack and error at once": (
        results_of(
            lambda entries: {"results": [{**ack_for(e, 1), "error": {"code": "x", "message": "y"}} for e in entries]}
        ),
        "bad_answer: invalid_rejection",
    ),
    "http 500": (answer(500, '{"results": []}'), "http_500"),
    "http 503": (answer(503, "busy", "text/plain"), "http_503"),
    "http 404": (answer(404, "not found", "text/plain"), "http_404"),
    "http 201 with acks": (answer(201, '{"results": []}'), "http_201"),
    "redirect": (answer(302, ""), "http_302"),
}


@pytest.mark.parametrize("case", sorted(GARBAGE))
async def test_garbage_is_never_an_acknowledgement(case: str, fake_ofd: FakeOfdFactory) -> None:
    handler, expected = GARBAGE[case]
    server = await fake_ofd(handler)
    assert await reason_from(server.url) == expected


async def test_one_bad_result_spoils_the_whole_batch(fake_ofd: FakeOfdFactory) -> None:
    def make(entries: list[dict[str, Any]]) -> Any:
        results = [ack_for(e, n + 1) for n, e in enumerate(entries)]
        results[-1]["fiscal_sign"] = None
        return {"results": results}

    server = await fake_ofd(results_of(make))
    with pytest.raises(UpstreamUnavailable) as info:
        await send_to(server.url, [item(n) for n in range(10)])
    assert info.value.reason == "bad_answer: invalid_ack"
    assert "result 9" in str(info.value)


async def test_extra_fields_are_tolerated(fake_ofd: FakeOfdFactory) -> None:
    server = await fake_ofd(
        results_of(lambda entries: {"version": 2, "results": [{**ack_for(e, 7), "extra": [1, 2]} for e in entries]})
    )
    results = await send_to(server.url, [item(1)])
    assert results == [OfdAck("rcpt-1", 7, "0123456789", "2026-11-24T03:00:01.000Z")]


async def test_content_type_with_charset_is_json(fake_ofd: FakeOfdFactory) -> None:
    async def handler(request: web.Request) -> web.StreamResponse:
        entries = json.loads(await request.read())
        body = json.dumps({"results": [ack_for(e, 1) for e in entries]})
        return web.Response(body=body.encode(), headers={"Content-Type": "application/json; charset=utf-8"})

    server = await fake_ofd(handler)
    assert isinstance((await send_to(server.url, [item(1)]))[0], OfdAck)


async def test_oversized_answer_is_refused(fake_ofd: FakeOfdFactory) -> None:
    huge = b'{"results": ["' + b"x" * (2 << 20) + b'"]}'
    server = await fake_ofd(answer(200, huge))
    assert await reason_from(server.url) == "bad_answer: too_large"


async def test_oversized_chunked_answer_is_refused(fake_ofd: FakeOfdFactory) -> None:
    async def handler(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "application/json"})
        response.enable_chunked_encoding()
        await response.prepare(request)
        await response.write(b'{"results": ["')
        for _ in range(40):
            await response.write(b"x" * 65536)
        await response.write(b'"]}')
        await response.write_eof()
        return response

    server = await fake_ofd(handler)
    assert await reason_from(server.url) == "bad_answer: too_large"


async def test_headers_that_never_come_are_a_timeout(fake_ofd: FakeOfdFactory) -> None:
    async def handler(request: web.Request) -> web.StreamResponse:
        await server.release.wait()
        return web.Response(status=500)

    server = await fake_ofd(handler)
    loop = asyncio.get_running_loop()
    started = loop.time()
    assert await reason_from(server.url, timeout_s=0.3) == "timeout"
    assert 0.25 <= loop.time() - started < 3.0


async def test_body_that_never_ends_is_a_timeout(fake_ofd: FakeOfdFactory) -> None:
    async def handler(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "application/json", "Content-Length": "100"})
        await response.prepare(request)
        await response.write(b'{"results": [')
        await server.release.wait()
        return response

    server = await fake_ofd(handler)
    assert await reason_from(server.url, timeout_s=0.3) == "timeout"


async def test_truncated_body_is_a_lost_connection(fake_ofd: FakeOfdFactory) -> None:
    async def handler(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "application/json", "Content-Length": "100"})
        await response.prepare(request)
        await response.write(b'{"results": [')
        assert request.transport is not None
        request.transport.close()
        return response

    server = await fake_ofd(handler)
    assert await reason_from(server.url) == "connection_lost"


async def test_reset_before_answer_is_a_lost_connection(fake_ofd: FakeOfdFactory) -> None:
    async def handler(request: web.Request) -> web.StreamResponse:
        assert request.transport is not None
        request.transport.abort()
        return web.Response()

    server = await fake_ofd(handler)
    assert await reason_from(server.url) == "connection_lost"


async def test_refused_connection_is_a_connect_error() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        # Bound but not listening: connecting is refused for as long as we hold the port.
        assert await reason_from(f"http://127.0.0.1:{port}") == "connect_error"


async def test_connect_that_hangs_is_a_connect_error_not_a_timeout() -> None:
    """A SYN nobody answers means nothing reached the OFD: that must not count as a failed delivery."""
    with contextlib.ExitStack() as stack:
        server = stack.enter_context(socket.socket())
        server.bind(("127.0.0.1", 0))
        server.listen(0)
        port = server.getsockname()[1]
        # Fill the accept queue of a listener that never accepts: later SYNs are dropped by the kernel.
        for _ in range(3):
            filler = stack.enter_context(socket.socket())
            filler.setblocking(False)
            filler.connect_ex(("127.0.0.1", port))
        loop = asyncio.get_running_loop()
        started = loop.time()
        with pytest.raises(UpstreamUnavailable) as info:
            await send_to(f"http://127.0.0.1:{port}", [item(1)], timeout_s=0.4)
        assert info.value.reason == "connect_error"
        assert "ConnectionTimeoutError" in str(info.value)
        assert loop.time() - started < 0.4  # the connect limit is half the request budget


async def test_non_http_answer_is_a_protocol_error() -> None:
    async def babble(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(1)
        writer.write(b"HELLO I AM NOT HTTP\r\n\r\n")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(babble, "127.0.0.1", 0)
    try:
        port = server.sockets[0].getsockname()[1]
        assert await reason_from(f"http://127.0.0.1:{port}") == "bad_answer: http_protocol"
    finally:
        server.close()
        await server.wait_closed()


# --- client behaviour ---------------------------------------------------------------------------------


async def test_wire_format(fake_ofd: FakeOfdFactory) -> None:
    server = await fake_ofd(acks_with())
    await send_to(server.url, [item(1), OfdItem("rcpt-2", "key-2", ACCEPTED_AT, receipt_json='{"a":"б"}')])
    envelope = {"accepted_at": ACCEPTED_AT}
    assert server.bodies == [
        [
            {"receipt_id": "rcpt-1", "idempotency_key": "key-1", **envelope, "receipt": receipt()},
            {"receipt_id": "rcpt-2", "idempotency_key": "key-2", **envelope, "receipt": {"a": "б"}},
        ]
    ]


async def test_connection_is_reused_across_batches(fake_ofd: FakeOfdFactory) -> None:
    server = await fake_ofd(acks_with())
    async with OfdClient(server.url, 5.0) as ofd_client:
        for n in range(10):
            await ofd_client.send_batch([item(n)])
    assert len(server.bodies) == 10
    assert len(server.peers) == 1


async def test_base_url_path_prefix_and_trailing_slash(fake_ofd: FakeOfdFactory) -> None:
    seen: list[str] = []

    async def handler(request: web.Request) -> web.StreamResponse:
        seen.append(request.path)
        return await acks_with()(request)

    app = web.Application()
    app.router.add_post("/ofd/api/v1/receipts", handler)
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    try:
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = runner.addresses[0][1]
        await send_to(f"http://127.0.0.1:{port}/ofd/api/", [item(1)])
        assert seen == ["/ofd/api/v1/receipts"]
    finally:
        await runner.cleanup()


async def test_cancellation_propagates_untouched(fake_ofd: FakeOfdFactory) -> None:
    async def handler(request: web.Request) -> web.StreamResponse:
        await server.release.wait()
        return web.Response()

    server = await fake_ofd(handler)
    async with OfdClient(server.url, 30.0) as ofd_client:
        task = asyncio.ensure_future(ofd_client.send_batch([item(1)]))
        await asyncio.wait_for(server.request_seen.wait(), 5.0)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task


@pytest.mark.parametrize("size", [0, 101])
async def test_batch_size_is_checked(size: int) -> None:
    async with OfdClient("http://127.0.0.1:9", 1.0) as ofd_client:
        with pytest.raises(ValueError):
            await ofd_client.send_batch([item(n) for n in range(size)])


async def test_messages_never_carry_credentials() -> None:
    # Built at run time so that the source lines a traceback quotes cannot contain them.
    user, secret = "op" + "erator", "s3" + "cr3t-token"
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        with pytest.raises(UpstreamUnavailable) as info:
            await send_to(f"http://{user}:{secret}@127.0.0.1:{port}/", [item(1)])
    # Not even a traceback logged with exc_info may show the URL: the transport error is not chained.
    rendered = "".join(traceback.format_exception(info.value))
    assert secret not in rendered and user not in rendered
    assert info.value.__cause__ is None and info.value.__suppress_context__
    with pytest.raises(ValueError) as bad:
        OfdClient(f"ftp://{user}:{secret}@example.invalid", 1.0)
    assert secret not in str(bad.value)


def test_item_needs_a_receipt() -> None:
    with pytest.raises(ValueError):
        OfdItem("r", "k", ACCEPTED_AT)


def test_client_parameters_are_checked() -> None:
    with pytest.raises(ValueError):
        OfdClient("http://127.0.0.1:9000", 0)
    with pytest.raises(ValueError):
        OfdClient("127.0.0.1:9000", 1.0)


async def test_close_is_idempotent_and_restartable(mock_ofd: MockOfd) -> None:
    ofd_client = OfdClient(mock_ofd.url, 5.0)
    await ofd_client.close()
    assert isinstance((await ofd_client.send_batch([item(1)]))[0], OfdAck)  # starts lazily
    await ofd_client.close()
    await ofd_client.close()
    await ofd_client.start()
    try:
        assert isinstance((await ofd_client.send_batch([item(1)]))[0], OfdAck)
    finally:
        await ofd_client.close()


@pytest.mark.parametrize(
    ("message", "field"),
    [
        ("Expected `int`, got `str` - at `$.payload.shift_number`", "payload.shift_number"),
        ("Expected `str`, got `null` - at `$.fiscal_sign`", "fiscal_sign"),
        ("Object missing required field `fn_number`", "fn_number"),
        ("Expected `object`, got `array`", "value"),
    ],
)
def test_a_bad_answer_names_the_field_never_the_value(message: str, field: str) -> None:
    assert invalid_field(msgspec.ValidationError(message)) == field
