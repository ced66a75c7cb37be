"""The raw-body fuzzer of tests/fuzzing.py against a live kktd: whatever the bytes, the answer is described
by kktd/openapi.yaml (no 5xx), a refused body stores nothing, and kktd's log stays free of errors and
tracebacks, one short line per refused request."""

from __future__ import annotations

import http.client

import pytest
from hypothesis import given

from kktd.safetext import FORBIDDEN_TEXT_RE
from tests.fuzzing import fuzz_settings, header_keys, hostile_bodies
from tests.openapi_contract import Contract
from tests.support import KktdProcess

# Starts kktd, a mock or another program as a process: the rest of `make test`, not the fast tier.
pytestmark = pytest.mark.process


class Live:
    def __init__(self, kktd: KktdProcess) -> None:
        self.kktd = kktd
        self.contract = Contract()
        self._conn: http.client.HTTPConnection | None = None

    def request(
        self, method: str, path: str, body: bytes | None = None, headers: dict[str, str] | None = None
    ) -> tuple[int, str, bytes]:
        for attempt in (1, 2):
            if self._conn is None:
                self._conn = http.client.HTTPConnection("127.0.0.1", self.kktd.port, timeout=10)
            try:
                self._conn.request(method, path, body=body, headers=headers or {})
                response = self._conn.getresponse()
                return response.status, response.getheader("Content-Type", ""), response.read()
            except (http.client.HTTPException, ConnectionError):
                # The server may close a connection after an error answer; one fresh try.
                self._conn.close()
                self._conn = None
                if attempt == 2:
                    raise
        raise AssertionError("unreachable")

    def stored(self) -> int:
        status, content_type, body = self.request("GET", "/v1/kkt/buffer/status")
        counts = self.contract.check("GET", "/v1/kkt/buffer/status", status, content_type, body)["counts"]
        return int(counts["pending"] + counts["sent"] + counts["failed"])


@pytest.fixture(scope="module")
def live(module_kktd: KktdProcess) -> Live:
    return Live(module_kktd)


@fuzz_settings(1000)
@given(body=hostile_bodies, header_key=header_keys)
def test_any_body_gets_a_described_answer_and_a_refusal_stores_nothing(
    live: Live, body: bytes, header_key: str | None
) -> None:
    headers = {"Content-Type": "application/json"}
    if header_key is not None and header_key.isascii() and header_key.isprintable():
        headers["Idempotency-Key"] = header_key
    before = live.stored()
    status, content_type, answer = live.request("POST", "/v1/kkt/receipt", body, headers)
    decoded = live.contract.check("POST", "/v1/kkt/receipt", status, content_type, answer)
    if status >= 300:
        assert live.stored() == before
        assert len(answer) < 1_000
        assert FORBIDDEN_TEXT_RE.search(decoded["error"]["message"]) is None


@fuzz_settings(300)
@given(body=hostile_bodies)
def test_any_resolution_body_gets_a_described_refusal(live: Live, body: bytes) -> None:
    """The operator's resolve route decodes a body of its own: the same hostile bodies (deep nesting, odd
    encodings, unknown fields) are refused by it with a described 4xx, never a 5xx."""
    path = "/v1/kkt/dlq/no-such-receipt/resolve"
    status, content_type, answer = live.request("POST", path, body, {"Content-Type": "application/json"})
    live.contract.check("POST", path, status, content_type, answer)
    assert 400 <= status < 500, (status, answer[:200])


def test_log_after_fuzzing_holds_no_error_and_only_short_lines(live: Live) -> None:
    log = live.kktd.log()
    assert "Traceback" not in log
    assert [line for line in log.splitlines() if " ERROR " in line or " CRITICAL " in line] == []
    assert max(len(line) for line in log.splitlines()) < 1_000
    assert live.kktd.proc is not None and live.kktd.proc.poll() is None
