"""kktd/openapi.yaml is true: it describes every route of the app and no other, every answer of every
documented status, provoked here one by one, matches its schema, and every request body and answer carries an
example that fits its schema and that kktd answers as shown."""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families

from kktd.delivery import Refused
from kktd.errors import ErrorCode
from kktd.openapi import spec, spec_json
from kktd.receipt import sample_receipt
from kktd.upstreams import REGISTRY
from kktd.upstreams.atol_driver import DriverSettings
from kktd_mocks.atol_driver import start_mock_register
from tests.conftest import App, close_app, open_app
from tests.openapi_contract import Contract, Operation
from tests.support import REPO

# aiohttp adds a HEAD route beside every GET; the test-only fault hook exists only with KKTD_TEST_FAULTS=1.
UNDESCRIBED = {("POST", "/v1/test/fault")}


def described_routes() -> set[tuple[str, str]]:
    return {(op.method, op.template) for op in Contract().operations()}


def app_routes(app: web.Application) -> set[tuple[str, str]]:
    return {
        (route.method, route.resource.canonical)
        for route in app.router.routes()
        if route.method != "HEAD" and route.resource is not None
    }


def test_spec_loads_and_is_openapi_3() -> None:
    document = spec()
    assert document["openapi"].startswith("3.")
    assert json.loads(spec_json()) == document


def test_the_served_json_is_the_yaml_written_by_hand() -> None:
    """kktd/openapi.json is built from kktd/openapi.yaml (packaging/openapi_json.py): a stale build fails here."""
    source = yaml.safe_load((Path(__file__).resolve().parent.parent / "kktd" / "openapi.yaml").read_text())
    assert spec() == source


def test_kktd_itself_imports_no_yaml_parser() -> None:
    """The run-time dependencies stay what setup.cfg says: no YAML parser is imported by the daemon."""
    code = "import sys, kktd.cli, kktd.app, kktd.daemon; print('yaml' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False", result.stderr


async def test_every_route_is_described_and_nothing_else(app: App) -> None:
    assert app_routes(app.kktd.web_app) == described_routes()


async def test_with_fault_hooks_only_the_fault_route_is_extra(tmp_path: Path) -> None:
    faulty = await open_app(tmp_path, faults=True)
    try:
        assert app_routes(faulty.kktd.web_app) - described_routes() == UNDESCRIBED
    finally:
        await close_app(faulty)


class Caller:
    def __init__(self, app: App, contract: Contract) -> None:
        self.app = app
        self.contract = contract

    async def __call__(
        self,
        method: str,
        path: str,
        expect: int,
        body: Any = None,
        raw: bytes | None = None,
        headers: dict[str, str] | None = None,
    ) -> Any:
        data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
        all_headers = {"Content-Type": "application/json", **(headers or {})} if data is not None else headers
        response = await self.app.client.request(method, path, data=data, headers=all_headers)
        payload = await response.read()
        assert response.status == expect, payload[:500]
        return self.contract.check(method, path.split("?")[0], response.status, response.content_type, payload)


@pytest.fixture
def contract() -> Contract:
    return Contract()


@pytest.fixture
async def rigged(tmp_path: Path) -> AsyncIterator[App]:
    """The app with its sync loop's upstream down (nothing listens on the discard port)."""
    application = await open_app(tmp_path / "rigged", ofd_url="http://127.0.0.1:9", ofd_timeout=0.5, body_timeout=0.3)
    try:
        yield application
    finally:
        await close_app(application)


async def test_every_documented_answer_is_provoked_and_matches(tmp_path: Path, rigged: App, contract: Contract) -> None:
    call = Caller(rigged, contract)
    receipt = sample_receipt("contract-1")
    accepted = await call("POST", "/v1/kkt/receipt", 201, receipt)
    await call("POST", "/v1/kkt/receipt", 200, receipt)
    await call("POST", "/v1/kkt/receipt", 409, dict(receipt, pos_id="POS-002"))
    await call("POST", "/v1/kkt/receipt", 422, dict(receipt, pos_id=""))
    await call("POST", "/v1/kkt/receipt", 400, raw=b"{not json")
    await call("POST", "/v1/kkt/receipt", 413, raw=b" " * (65 * 1024))
    await call("POST", "/v1/kkt/receipt", 415, raw=b"{}", headers={"Content-Type": "text/plain"})
    receipt_id = accepted["receipt_id"]
    await call("GET", f"/v1/kkt/receipt/{receipt_id}", 200)
    await call("GET", "/v1/kkt/receipt/nothing-here", 404)
    await call("GET", "/v1/kkt/receipt?idempotency_key=contract-1", 200)
    await call("GET", "/v1/kkt/receipt?idempotency_key=nothing-here", 404)
    await call("GET", "/v1/kkt/receipt", 400)
    await call("GET", "/v1/kkt/buffer/status", 200)
    await call("POST", "/v1/kkt/buffer/sync", 200)
    await call("GET", "/v1/kkt/dlq", 200)
    await call("GET", "/v1/kkt/dlq?limit=0", 400)
    await call("POST", f"/v1/kkt/dlq/{receipt_id}/requeue", 409)
    await call("POST", "/v1/kkt/dlq/nothing-here/requeue", 404)
    await rigged.store.settle([Refused(receipt_id, "test_refusal", "refused by the contract test")])
    listing = await call("GET", "/v1/kkt/dlq?limit=10&after_seq=0", 200)
    assert listing["count"] == 1
    await call("GET", f"/v1/kkt/receipt/{receipt_id}", 200)
    await call("POST", f"/v1/kkt/dlq/{receipt_id}/requeue", 200)
    reason = {"reason": "fiscalized by hand on register 2"}
    await call("POST", f"/v1/kkt/dlq/{receipt_id}/resolve", 409, reason)  # pending again: not a dead letter
    await call("POST", "/v1/kkt/dlq/nothing-here/resolve", 404, reason)
    await rigged.store.settle([Refused(receipt_id, "test_refusal", "refused again")])
    await call("POST", f"/v1/kkt/dlq/{receipt_id}/resolve", 400, raw=b"[1]")
    await call("POST", f"/v1/kkt/dlq/{receipt_id}/resolve", 422, {"reason": ""})
    await call("POST", f"/v1/kkt/dlq/{receipt_id}/resolve", 413, raw=b" " * (65 * 1024))
    await call("POST", f"/v1/kkt/dlq/{receipt_id}/resolve", 415, raw=b"{}", headers={"Content-Type": "text/plain"})
    duplicate = await call("POST", f"/v1/kkt/dlq/{receipt_id}/resolve", 400, raw=b'{"reason":"a","reason":"b"}')
    assert duplicate["error"]["code"] == "duplicate_key"
    unknown = await call("POST", f"/v1/kkt/dlq/{receipt_id}/resolve", 422, {"reason": "ok", "x": 1})
    assert (unknown["error"]["code"], unknown["error"]["field"]) == ("unknown_field", "x")
    gzipped = {"Content-Encoding": "gzip"}
    encoded = await call("POST", "/v1/kkt/receipt", 415, raw=b"\x1f\x8b\x08\x00", headers=gzipped)
    assert encoded["error"]["code"] == "unsupported_media_type"
    resolved = await call("POST", f"/v1/kkt/dlq/{receipt_id}/resolve", 200, reason)
    assert (
        resolved["status"] == "resolved"
        and (await call("GET", f"/v1/kkt/receipt/{receipt_id}", 200))["resolution"] == reason["reason"]
    )
    await call("GET", "/v1/health", 200)
    exported = await call("GET", "/v1/kkt/receipts?since=2020-01-01T00:00:00Z", 200)
    assert [line["receipt_id"] for line in exported] == [receipt_id]
    await call("GET", "/v1/kkt/receipts?since=yesterday", 400)
    await call("GET", "/metrics", 200)

    rigged.services.task_failures["sync"] = "RuntimeError('provoked by the contract test')"
    await call("GET", "/v1/health", 503)
    rigged.services.intake_open = False
    await call("POST", "/v1/kkt/receipt", 503, sample_receipt("contract-2"))

    # Storage gone: every operation that needs the database answers 503 storage_unavailable.
    await rigged.store.close()
    rigged.services.intake_open = True
    await call("POST", "/v1/kkt/receipt", 503, sample_receipt("contract-3"))
    await call("GET", f"/v1/kkt/receipt/{receipt_id}", 503)
    await call("GET", "/v1/kkt/receipt?idempotency_key=contract-1", 503)
    await call("GET", "/v1/kkt/buffer/status", 503)
    await call("GET", "/v1/kkt/dlq", 503)
    await call("POST", f"/v1/kkt/dlq/{receipt_id}/requeue", 503)
    await call("POST", f"/v1/kkt/dlq/{receipt_id}/resolve", 503, {"reason": "x"})
    await call("GET", "/v1/kkt/receipts", 503)
    rigged.services.sync = None
    await call("POST", "/v1/kkt/buffer/sync", 503)

    # A body that never arrives: 408 after body_timeout (raw socket: the head, then nothing).
    answer = await slow_body(rigged, contract)
    assert answer["error"]["code"] == "body_timeout"
    answer = await slow_body(rigged, contract, f"/v1/kkt/dlq/{receipt_id}/resolve")
    assert answer["error"]["code"] == "body_timeout"
    await call("GET", "/v1/openapi.json", 200)

    await provoke_unauthorized(tmp_path, contract)
    await provoke_shift_answers(tmp_path, contract)
    assert contract.never_seen() == set(), "documented answers no test provokes"


TOKEN = "contract-test-token-0123456789"


def template(path: str) -> str:
    """The spec's path for a concrete one: the receipt id in a dead-letter route back to its parameter."""
    return re.sub(r"^/v1/kkt/dlq/[^/]+/", "/v1/kkt/dlq/{receipt_id}/", path)


async def provoke_shift_answers(tmp_path: Path, contract: Contract) -> None:
    """The shift routes: 409 no_register on an upstream that is not a register; on the register's upstream
    every answer, the register's report in the buffer status, and 503 once its web server is gone."""
    plain = await open_app(tmp_path / "plain")
    try:
        call = Caller(plain, contract)
        for method, path in (("GET", "/v1/kkt/shift"), ("POST", "/v1/kkt/shift/open"), ("POST", "/v1/kkt/shift/close")):
            assert (await call(method, path, 409))["error"]["code"] == "no_register"
    finally:
        await close_app(plain)
    mock = await start_mock_register()
    register = await open_app(
        tmp_path / "register", upstream="atol-driver", upstream_settings=DriverSettings(url=mock.url, timeout=2.0)
    )
    try:
        call = Caller(register, contract)
        assert (await call("GET", "/v1/kkt/shift", 200))["state"] == "closed"
        assert (await call("POST", "/v1/kkt/shift/close", 409))["error"]["code"] == "shift_state"
        assert (await call("POST", "/v1/kkt/shift/open", 200))["state"] == "open"
        assert (await call("POST", "/v1/kkt/shift/open", 409))["error"]["code"] == "shift_state"
        await register.kktd.sync.housekeeping.check_register()
        status = await call("GET", "/v1/kkt/buffer/status", 200)
        assert status["register"]["shift"]["state"] == "open" and status["register"]["paper_present"] is True
        closed = await call("POST", "/v1/kkt/shift/close", 200)
        assert closed["state"] == "closed" and closed["expires_at"] is None, closed
        # The register's report shows the new shift at once, not at the next minute.
        assert (await call("GET", "/v1/kkt/buffer/status", 200))["register"]["shift"]["state"] == "closed"
        await mock.go_offline()
        for method, path in (("GET", "/v1/kkt/shift"), ("POST", "/v1/kkt/shift/open"), ("POST", "/v1/kkt/shift/close")):
            assert (await call(method, path, 503))["error"]["code"] == "register_unavailable"
    finally:
        await close_app(register)
        await mock.close()


async def provoke_unauthorized(tmp_path: Path, contract: Contract) -> None:
    guarded = await open_app(tmp_path / "guarded", api_token=TOKEN)
    try:
        call = Caller(guarded, contract)
        for method, path in sorted(described_routes()):
            if path in ("/v1/health", "/metrics"):
                continue
            concrete = path.replace("{receipt_id}", "0" * 32)
            body = sample_receipt("unauthorized-1") if method == "POST" else None
            answer = await call(method, concrete, 401, body, headers={"Authorization": "Bearer wrong"})
            assert answer["error"]["code"] == "unauthorized"
        await call("GET", "/v1/health", 200)
        await call("GET", "/metrics", 200)
    finally:
        await close_app(guarded)


async def slow_body(app: App, contract: Contract, path: str = "/v1/kkt/receipt") -> dict[str, Any]:
    server = app.client.server
    reader, writer = await asyncio.open_connection(server.host, server.port)
    try:
        writer.write(
            f"POST {path} HTTP/1.1\r\nHost: kktd\r\nContent-Type: application/json\r\n".encode()
            + b"Content-Length: 1000\r\n\r\n{"
        )
        await writer.drain()
        head = await reader.readuntil(b"\r\n\r\n")
        status = int(head.split(b" ", 2)[1])
        length = int(
            next(line.split(b":", 1)[1] for line in head.split(b"\r\n") if line.lower().startswith(b"content-length:"))
        )
        body = await reader.readexactly(length)
        answer: dict[str, Any] = contract.check("POST", template(path), status, "application/json", body)
        return answer
    finally:
        writer.close()


async def test_buffer_full_is_the_documented_503(tmp_path: Path, contract: Contract) -> None:
    small = await open_app(tmp_path, max_pending=1)
    try:
        call = Caller(small, contract)
        await call("POST", "/v1/kkt/receipt", 201, sample_receipt("full-1"))
        answer = await call("POST", "/v1/kkt/receipt", 503, sample_receipt("full-2"))
        assert answer["error"]["code"] == "buffer_full"
    finally:
        await close_app(small)


def test_the_receipt_schema_names_exactly_the_models_fields_and_values() -> None:
    """The request schema and kktd/receipt.py say the same: field sets and every enumeration."""
    from kktd import receipt

    schemas = spec()["components"]["schemas"]
    assert set(schemas["ReceiptIn"]["properties"]) == receipt.RECEIPT_FIELDS
    assert set(schemas["ItemIn"]["properties"]) == receipt.ITEM_FIELDS
    assert set(schemas["Payment"]["properties"]) == receipt.PAYMENT_FIELDS
    assert set(schemas["Cashier"]["properties"]) == receipt.CASHIER_FIELDS
    for name, values in [
        ("Operation", receipt.OPERATIONS),
        ("Taxation", receipt.TAXATIONS),
        ("Vat", receipt.VAT_RATES),
        ("PaymentMethod", receipt.PAYMENT_METHODS),
        ("PaymentObject", receipt.PAYMENT_OBJECTS),
        ("PaymentType", receipt.PAYMENT_TYPES),
        ("Measure", receipt.MEASURES),
    ]:
        assert set(schemas[name]["enum"]) == values, name


# What differs from one run to the next: left out where an answer is compared with its example.
VOLATILE = {"receipt_id", "accepted_at", "updated_at"}


def examples_of(contract: Contract, media: dict[str, Any]) -> list[tuple[str, Any]]:
    """(name, value) of a media type's `example` and each of its `examples` (a named one may be a $ref)."""
    found = [("example", media["example"])] if "example" in media else []
    found += [(name, contract._resolve(item)["value"]) for name, item in media.get("examples", {}).items()]
    return found


def described_media(contract: Contract) -> list[tuple[Operation, str, str, dict[str, Any]]]:
    """(operation, "request" or the status, media type, media object) for every request body and answer."""
    found = []
    for op in contract.operations():
        operation = contract.document["paths"][op.template][op.method.lower()]
        for media_type, media in contract._resolve(operation.get("requestBody", {})).get("content", {}).items():
            found.append((op, "request", media_type, media))
        for status, response in operation["responses"].items():
            for media_type, media in contract._resolve(response).get("content", {}).items():
                found.append((op, status, media_type, media))
    return found


def single_example(contract: Contract, template: str, method: str, status: str = "request") -> Any:
    operation = contract.document["paths"][template][method]
    holder = operation["requestBody"] if status == "request" else contract._resolve(operation["responses"][status])
    [(_, value)] = examples_of(contract, holder["content"]["application/json"])
    return value


def code_statuses(code: str) -> set[int]:
    """The statuses the table of errors gives a code (kktd.errors.ErrorCode, or an upstream's intake code)."""
    members = {c.value: c for c in ErrorCode}
    if code in members:
        return set(members[code].statuses)
    assert code in {c for spec in REGISTRY.values() for c in spec.intake_codes}, f"{code} is in no table"
    return {422}


def test_every_request_body_and_answer_has_an_example(contract: Contract) -> None:
    """Each operation's request body, its success answers and each error answer (the shared responses too)
    carry an example a client can read."""
    missing = [
        f"{op.method} {op.template} {where} {media_type}"
        for op, where, media_type, media in described_media(contract)
        if not examples_of(contract, media)
    ]
    assert not missing, missing
    for op in contract.operations():
        statuses = contract.documented_statuses(op)
        assert any(200 <= status < 300 for status in statuses), op


def test_every_example_matches_its_schema(contract: Contract) -> None:
    """The examples of the served spec are answers kktd could give: each fits its schema, an error example's
    code is one kktd answers with that status (the table of errors), a header's example fits the header."""
    checked = 0
    for op, where, media_type, media in described_media(contract):
        status = 0 if where == "request" else int(where)
        for name, value in examples_of(contract, media):
            checked += 1
            if media_type == "application/json":
                contract._validate(media["schema"], value, op, status)
                if media["schema"] == {"$ref": "#/components/schemas/Error"}:
                    code = value["error"]["code"]
                    assert status in code_statuses(code), f"{op.method} {op.template} {status} example {name}: {code}"
            elif media_type == "application/x-ndjson":
                lines = [json.loads(line) for line in value.splitlines()]
                assert lines, (op, name)
                for line in lines:
                    contract._validate({"$ref": "#/components/schemas/ReceiptView"}, line, op, status)
            else:
                assert media_type == "text/plain" and isinstance(value, str), (op, media_type)
                assert list(text_string_to_metric_families(value)), (op, name)
    for op in contract.operations():
        for response in contract.document["paths"][op.template][op.method.lower()]["responses"].values():
            for header in contract._resolve(response).get("headers", {}).values():
                if "example" in header:
                    contract._validate(header["schema"], header["example"], op, 0)
    assert checked >= len(contract.operations())


def test_the_examples_tell_the_docs_story(contract: Contract) -> None:
    """The spec's examples and docs/api.md show the same receipts: the posted receipt is the one in the docs,
    and every receipt id in an example is one the docs show."""
    docs = (REPO / "docs" / "api.md").read_text()
    section = docs[docs.index("## `POST /v1/kkt/receipt`") :]
    block = section[section.index("```json\n") + len("```json\n") : section.index("\n```", section.index("```json"))]
    assert json.loads(block) == single_example(contract, "/v1/kkt/receipt", "post")
    ids = set(
        re.findall(
            r"\b[0-9a-f]{32}\b",
            json.dumps([v for *_, m in described_media(contract) for v in examples_of(contract, m)]),
        )
    )
    assert ids and not {receipt_id for receipt_id in ids if receipt_id not in docs}, ids


def without(value: Any, keys: set[str]) -> Any:
    """`value` with `keys` left out at every depth (what differs from one run to the next)."""
    if isinstance(value, dict):
        return {k: without(v, keys) for k, v in value.items() if k not in keys}
    if isinstance(value, list):
        return [without(v, keys) for v in value]
    return value


async def test_kktd_answers_the_examples_requests_as_the_examples_show(app: App, contract: Contract) -> None:
    """kktd takes the example receipt and answers as the examples show (ids and times aside): its 201 and
    200, the receipt as stored, found by its key; the example dead letter listed, requeued, then resolved
    with the example reason."""
    posted = single_example(contract, "/v1/kkt/receipt", "post")
    response = await app.client.post("/v1/kkt/receipt", json=posted)
    assert response.status == 201
    accepted = await response.json()
    assert without(accepted, VOLATILE) == without(single_example(contract, "/v1/kkt/receipt", "post", "201"), VOLATILE)
    replayed = await (await app.client.post("/v1/kkt/receipt", json=posted)).json()
    assert replayed == accepted
    shown = single_example(contract, "/v1/kkt/receipt/{receipt_id}", "get", "200")
    for path in (
        f"/v1/kkt/receipt/{accepted['receipt_id']}",
        f"/v1/kkt/receipt?idempotency_key={posted['idempotency_key']}",
    ):
        view = await (await app.client.get(path)).json()
        # The example is the receipt once sent; here nothing delivers it: the stored receipt is compared.
        assert (view["idempotency_key"], view["total"], view["receipt"]) == (
            shown["idempotency_key"],
            shown["total"],
            shown["receipt"],
        )

    listing = single_example(contract, "/v1/kkt/dlq", "get", "200")
    [dead] = listing["dead_letters"]
    response = await app.client.post(
        "/v1/kkt/receipt", json=dict(posted, idempotency_key=dead["idempotency_key"], pos_id=dead["receipt"]["pos_id"])
    )
    receipt_id = (await response.json())["receipt_id"]
    code, _, message = dead["last_error"].partition(": ")
    await app.store.settle([Refused(receipt_id, code, message)])
    answer = await (await app.client.get("/v1/kkt/dlq")).json()
    assert without(answer, VOLATILE) == without(listing, VOLATILE)

    requeued = await (await app.client.post(f"/v1/kkt/dlq/{receipt_id}/requeue")).json()
    assert requeued == dict(
        single_example(contract, "/v1/kkt/dlq/{receipt_id}/requeue", "post", "200"), receipt_id=receipt_id
    )
    await app.store.settle([Refused(receipt_id, code, message)])
    reason = single_example(contract, "/v1/kkt/dlq/{receipt_id}/resolve", "post")
    response = await app.client.post(f"/v1/kkt/dlq/{receipt_id}/resolve", json=reason)
    assert response.status == 200
    resolved = single_example(contract, "/v1/kkt/dlq/{receipt_id}/resolve", "post", "200")
    assert await response.json() == dict(resolved, receipt_id=receipt_id)
