"""Bodies a hostile or broken client sends: each is a 4xx with a stable code, stores nothing, and whatever of
the client's text the answer echoes is escaped and short."""

from __future__ import annotations

import codecs
import json
import logging
from typing import Any

import pytest

from kktd.receipt import sample_receipt
from kktd.safetext import FORBIDDEN_TEXT_RE, escape, forbidden_character, quoted
from tests.conftest import App


def good(key: str = "hostile-1") -> dict[str, Any]:
    return sample_receipt(key)


def utf8(body: Any) -> bytes:
    return json.dumps(body, ensure_ascii=False).encode()


def with_name(name: str) -> bytes:
    body = good()
    body["items"][0]["name"] = name
    return json.dumps(body).encode()  # ASCII escapes: "\u202e" travels as the client would send it


GOOD_TEXT = json.dumps(good(), ensure_ascii=False)
DUPLICATE_KEY = GOOD_TEXT[:-1] + ', "idempotency_key": "hostile-2"}'
DEEP = b"[" * 30_000 + b"]" * 30_000  # under the 64 KiB body limit
HUGE_KEY = "k" * 60_000

# (id, body, status, code)
HOSTILE: list[tuple[str, bytes, int, str]] = [
    ("UTF-8 byte order mark", codecs.BOM_UTF8 + GOOD_TEXT.encode(), 400, "invalid_encoding"),
    ("UTF-16 with BOM", GOOD_TEXT.encode("utf-16"), 400, "invalid_encoding"),
    ("UTF-16-LE without BOM", GOOD_TEXT.encode("utf-16-le"), 400, "invalid_encoding"),
    ("UTF-16-BE without BOM", GOOD_TEXT.encode("utf-16-be"), 400, "invalid_encoding"),
    ("UTF-32 with BOM", GOOD_TEXT.encode("utf-32"), 400, "invalid_encoding"),
    ("UTF-32-LE without BOM", GOOD_TEXT.encode("utf-32-le"), 400, "invalid_encoding"),
    ("Latin-1 byte", GOOD_TEXT.replace("Молоко", "Milch\xe9").encode("latin-1", "replace"), 400, "invalid_encoding"),
    (
        "raw lone surrogate (invalid UTF-8)",
        GOOD_TEXT.replace("Молоко", "\ud800").encode("utf-8", "surrogatepass"),
        400,
        "invalid_encoding",
    ),
    ("duplicate idempotency_key", DUPLICATE_KEY.encode(), 400, "duplicate_key"),
    (
        "duplicate key in an item",
        GOOD_TEXT.replace('"price": 8990', '"price": 8990, "price": 1').encode(),
        400,
        "duplicate_key",
    ),
    ("NaN", GOOD_TEXT.replace("8990", "NaN", 1).encode(), 400, "invalid_json"),
    ("Infinity", GOOD_TEXT.replace("8990", "-Infinity", 1).encode(), 400, "invalid_json"),
    ("5,000-digit integer", GOOD_TEXT.replace("8990", "9" * 5000, 1).encode(), 400, "number_too_large"),
    ("1e400 amount", GOOD_TEXT.replace("8990", "1e400", 1).encode(), 422, "invalid_type"),
    ("30,000 nested arrays", DEEP, 400, "nesting_too_deep"),
    ("10,000 nested objects", b'{"a":' * 10_000 + b"1" + b"}" * 10_000, 400, "nesting_too_deep"),
    ("escaped lone surrogate as a key", b'{"\\ud800": 1}', 422, "unknown_field"),
    ("60 KB field name", utf8(dict(good(), **{HUGE_KEY: 1})), 422, "unknown_field"),
    ("control characters in a field name", utf8(dict(good(), **{"a\x00\x1b[31mb\r\n": 1})), 422, "unknown_field"),
    ("right-to-left override in a name", with_name("Молоко \u202eакнортС"), 422, "invalid_value"),
    ("left-to-right isolate in a name", with_name("Молоко \u2066x\u2069"), 422, "invalid_value"),
    ("Arabic letter mark in a name", with_name("Молоко\u061c"), 422, "invalid_value"),
    ("right-to-left mark in a name", with_name("Молоко\u200f"), 422, "invalid_value"),
    ("C1 control in a name", with_name("Молоко\x85"), 422, "invalid_value"),
    ("line separator in a name", with_name("Молоко\u2028Хлеб"), 422, "invalid_value"),
    ("byte order mark inside a name", with_name("\ufeffМолоко"), 422, "invalid_value"),
    ("bidi override in pos_id", utf8(dict(good(), pos_id="POS\u202e1")), 422, "invalid_value"),
    (
        "bidi override in the cashier's name",
        utf8(dict(good(), cashier={"name": "Ив\u202eанова"})),
        422,
        "invalid_value",
    ),
    (
        "NUL in customer_contact",
        json.dumps(dict(good(), customer_contact="a\x00b@example.ru")).encode(),
        422,
        "invalid_contact",
    ),
    (
        "bidi override in customer_contact",
        utf8(dict(good(), customer_contact="a\u202eb@example.ru")),
        422,
        "invalid_contact",
    ),
]


async def post_raw(app: App, body: bytes) -> tuple[int, dict[str, Any], int]:
    response = await app.client.post("/v1/kkt/receipt", data=body, headers={"Content-Type": "application/json"})
    raw = await response.read()
    return response.status, json.loads(raw), len(raw)


@pytest.mark.parametrize(("name", "body", "status", "code"), HOSTILE, ids=[row[0] for row in HOSTILE])
async def test_hostile_body_is_a_clear_4xx_and_stores_nothing(
    app: App, caplog: pytest.LogCaptureFixture, name: str, body: bytes, status: int, code: str
) -> None:
    caplog.set_level(logging.DEBUG)
    got, answer, size = await post_raw(app, body)
    assert (got, answer["error"]["code"]) == (status, code), answer
    assert await app.row_count() == 0
    # The answer and the log line echo the client's text only escaped and cut short.
    assert size < 1_000
    for text in (answer["error"]["message"], answer["error"].get("field") or ""):
        assert FORBIDDEN_TEXT_RE.search(text) is None, text
    lines = [r.getMessage() for r in caplog.records if r.name.startswith("kktd")]
    assert lines, "every refused request is logged"
    for line in lines:
        assert len(line) < 1_000
        assert FORBIDDEN_TEXT_RE.search(line) is None, line
    assert not any(r.exc_info for r in caplog.records), "a client's mistake is not a traceback"


async def test_valid_receipt_still_accepted_after_every_hostile_body(app: App) -> None:
    for _, body, _, _ in HOSTILE:
        await post_raw(app, body)
    got, answer, _ = await post_raw(app, utf8(good("after-hostile")))
    assert got == 201, answer


async def test_duplicate_key_answer_names_the_key(app: App) -> None:
    _, answer, _ = await post_raw(app, DUPLICATE_KEY.encode())
    assert '"idempotency_key"' in answer["error"]["message"]


async def test_non_ascii_names_without_formatting_characters_are_kept(app: App) -> None:
    body = good("kept-1")
    body["items"][0]["name"] = "Ёжик «в тумане» — 1 шт. 😀 naïve"
    got, answer, _ = await post_raw(app, utf8(body))
    assert got == 201, answer
    row = await app.store.get(answer["receipt_id"])
    assert row is not None and json.loads(row.body)["items"][0]["name"] == body["items"][0]["name"]


# ---- the escaping helper itself ----


@pytest.mark.parametrize(
    ("raw", "shown"),
    [
        ("plain", "plain"),
        ("a\nb", "a\\nb"),
        ("\x00\x1b[31m", "\\x00\\x1b[31m"),
        ("x\u202ey", "x\\u202ey"),
        ("lone \ud800", "lone \\ud800"),
        ("back\\slash", "back\\\\slash"),
        ("Молоко", "Молоко"),
    ],
)
def test_escape(raw: str, shown: str) -> None:
    assert escape(raw) == shown
    escape(raw).encode("utf-8")


def test_escape_truncates_and_says_how_much_was_left_out() -> None:
    shown = escape("k" * 100_000, limit=200)
    assert shown == "k" * 200 + "…[99800 more characters]"
    shown = escape("\x00" * 1_000, limit=200)
    assert len(shown) < 250 and shown.endswith("more characters]")


def test_quoted_and_forbidden_character() -> None:
    assert quoted('say "hi"') == '"say \\"hi\\""'
    assert forbidden_character("ok") is None
    assert forbidden_character("a\u202eb") == "U+202E RIGHT-TO-LEFT OVERRIDE"
    assert forbidden_character("a\ud800") == "U+D800 lone surrogate"


COMPRESSED_ROUTES = [
    ("POST", "/v1/kkt/receipt"),
    ("POST", "/v1/kkt/buffer/sync"),
    ("POST", "/v1/kkt/dlq/00000000000000000000000000000000/requeue"),
    ("POST", "/v1/kkt/dlq/00000000000000000000000000000000/resolve"),
    ("POST", "/v1/kkt/shift/open"),
    ("GET", "/v1/kkt/buffer/status"),
]


@pytest.mark.parametrize("encoding", ["gzip", "deflate", "br", "zstd", "x-unknown"])
@pytest.mark.parametrize(("method", "path"), COMPRESSED_ROUTES)
async def test_a_compressed_body_is_refused_before_anything_decodes_it(
    app: App, caplog: pytest.LogCaptureFixture, method: str, path: str, encoding: str
) -> None:
    """A body no decoder of kktd's is meant to meet (aiohttp's gzip reader would fail mid-read): 415 on every
    route, one log line, no traceback, nothing stored."""
    caplog.set_level(logging.DEBUG)
    headers = {"Content-Type": "application/json", "Content-Encoding": encoding}
    body = b"\x1f\x8b\x08\x00not really compressed" * 100
    response = await app.client.request(method, path, data=body, headers=headers)
    answer = json.loads(await response.read())
    assert (response.status, answer["error"]["code"]) == (415, "unsupported_media_type"), answer
    assert await app.row_count() == 0
    assert not any(r.exc_info for r in caplog.records), "a client's encoding is not a traceback"


async def test_the_export_has_no_head_that_would_stream_a_body(app: App) -> None:
    response = await app.client.head("/v1/kkt/receipts")
    assert response.status == 405


def test_the_cli_sends_arguments_that_are_not_utf8_as_their_bytes() -> None:
    from kktd.ctl import _query, _segment

    assert _segment("\udcff\udcfe") == "%FF%FE"  # how Python hands over argv bytes that are not UTF-8
    assert _query({"idempotency_key": "\udcff"}) == "idempotency_key=%FF"


def test_a_request_the_http_parser_refuses_is_one_short_warning_without_a_traceback() -> None:
    from aiohttp.http_exceptions import BadHttpMessage, LineTooLong

    from kktd.logs import ClientMistakeFilter

    for exc in (BadHttpMessage("Invalid method encountered: b'FOO\x1b[31m'"), LineTooLong("x" * 9000, "8190")):
        record = logging.LogRecord("aiohttp.server", logging.ERROR, __file__, 1, "Error handling request", (), None)
        record.exc_info = (type(exc), exc, None)
        assert ClientMistakeFilter().filter(record)
        assert (record.levelno, record.exc_info) == (logging.WARNING, None)
        line = record.getMessage()
        assert len(line) < 400 and FORBIDDEN_TEXT_RE.search(line) is None, line
