"""Access control: the optional bearer token, the refusal to listen beyond loopback without one, and the
dead-letter listing's masked customer contacts."""

from __future__ import annotations

import hmac
import json
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest

from kktd import api
from kktd import config as config_module
from kktd.delivery import Refused
from kktd.errors import ConfigError
from kktd.receipt import sample_receipt
from tests.conftest import AppFactory
from tests.openapi_contract import Contract
from tests.support import KKTD_BIN, KktdProcess, free_port

TOKEN = "s3cret-token-for-the-access-tests-0123"
EX_CONFIG = 78


def load(**environ: str) -> config_module.Config:
    return config_module.load(None, environ={"KKTD_CONFIG": os.devnull, **environ})


def token_file(tmp_path: Path, text: str = TOKEN + "\n") -> Path:
    path = tmp_path / "api_token"
    path.write_text(text)
    path.chmod(0o600)
    return path


ROUTES = [
    ("POST", "/v1/kkt/receipt"),
    ("GET", "/v1/kkt/receipt/" + "0" * 32),
    ("GET", "/v1/kkt/buffer/status"),
    ("POST", "/v1/kkt/buffer/sync"),
    ("GET", "/v1/kkt/dlq"),
    ("POST", "/v1/kkt/dlq/" + "0" * 32 + "/requeue"),
    ("GET", "/v1/openapi.json"),
]


@pytest.mark.parametrize(("method", "path"), ROUTES)
@pytest.mark.parametrize(
    "authorization",
    [None, "Bearer wrong-token", f"Basic {TOKEN}", f"Bearer {TOKEN}x", f"Bearer {TOKEN[:-1]}", "Bearer"],
)
async def test_every_endpoint_but_health_needs_the_token(
    app_factory: AppFactory, method: str, path: str, authorization: str | None
) -> None:
    app = await app_factory(api_token=TOKEN)
    headers = {"Authorization": authorization} if authorization is not None else {}
    response = await app.client.request(
        method, path, json=sample_receipt("t-1") if method == "POST" else None, headers=headers
    )
    assert response.status == 401
    answer = await response.json()
    assert answer["error"]["code"] == "unauthorized"
    assert response.headers["WWW-Authenticate"].startswith("Bearer")
    assert await app.row_count() == 0


@pytest.mark.parametrize(("method", "path"), ROUTES)
async def test_the_token_opens_every_endpoint(app_factory: AppFactory, method: str, path: str) -> None:
    app = await app_factory(api_token=TOKEN, ofd_url="http://127.0.0.1:9", ofd_timeout=0.5)
    response = await app.client.request(
        method,
        path,
        json=sample_receipt("t-2") if method == "POST" else None,
        headers={"Authorization": f"Bearer {TOKEN}"},
    )
    assert response.status != 401
    Contract().check(method, path, response.status, response.content_type, await response.read())


async def test_health_needs_no_token(app_factory: AppFactory) -> None:
    app = await app_factory(api_token=TOKEN)
    response = await app.client.get("/v1/health")
    assert response.status == 200


async def test_without_a_configured_token_no_header_is_needed(app_factory: AppFactory) -> None:
    app = await app_factory()
    response = await app.client.post("/v1/kkt/receipt", json=sample_receipt("t-3"))
    assert response.status == 201


def test_the_comparison_is_constant_time(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[bytes, bytes]] = []
    real = hmac.compare_digest

    def spy(a: bytes, b: bytes) -> bool:
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(api.hmac, "compare_digest", spy)

    class FakeRequest:
        headers = {"Authorization": f"Bearer {TOKEN}"}

    assert api.presents_token(FakeRequest(), TOKEN)  # type: ignore[arg-type]
    assert calls == [(TOKEN.encode(), TOKEN.encode())]


# ---- where the token comes from, and listening beyond loopback ----


def test_token_from_a_file_and_never_shown(tmp_path: Path) -> None:
    config = load(KKTD_API_TOKEN_FILE=str(token_file(tmp_path)))
    assert config.api_token == TOKEN
    assert TOKEN not in repr(config) and TOKEN not in str(config.describe())


def test_token_from_the_systemd_credential(tmp_path: Path) -> None:
    credentials = tmp_path / "credentials"
    credentials.mkdir()
    (credentials / "api_token").write_text(TOKEN)
    assert load(CREDENTIALS_DIRECTORY=str(credentials)).api_token == TOKEN


@pytest.mark.parametrize("text", ["", "short", "has a space in it 0123456789", "\x00" * 20])
def test_a_bad_token_file_is_a_configuration_error(tmp_path: Path, text: str) -> None:
    with pytest.raises(ConfigError, match="api_token_file"):
        load(KKTD_API_TOKEN_FILE=str(token_file(tmp_path, text)))


def test_an_unreadable_token_file_is_a_configuration_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="api_token_file.*cannot be read"):
        load(KKTD_API_TOKEN_FILE=str(tmp_path / "missing"))


@pytest.mark.parametrize("listen", ["0.0.0.0:8731", "[::]:8731", "192.168.1.10:8731", "kktd.local:8731"])
def test_listening_beyond_loopback_needs_a_token(tmp_path: Path, listen: str) -> None:
    with pytest.raises(ConfigError, match="^listen = .*api_token_file"):
        load(KKTD_LISTEN=listen)
    assert load(KKTD_LISTEN=listen, KKTD_API_TOKEN_FILE=str(token_file(tmp_path))).api_token == TOKEN


@pytest.mark.parametrize("listen", ["127.0.0.1:8731", "127.0.0.2:8731", "[::1]:8731", "localhost:8731"])
def test_loopback_needs_no_token(listen: str) -> None:
    assert load(KKTD_LISTEN=listen).api_token is None


def test_kktd_serve_refuses_to_listen_beyond_loopback_without_a_token(tmp_path: Path) -> None:
    result = subprocess.run(
        [
            str(KKTD_BIN),
            "serve",
            "--config",
            os.devnull,
            "--db",
            str(tmp_path / "b.db"),
            "--listen",
            f"0.0.0.0:{free_port()}",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        env={k: v for k, v in os.environ.items() if not k.startswith("KKTD_")},
    )
    assert result.returncode == EX_CONFIG
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "listen" in lines[0] and "api_token_file" in lines[0], result.stderr
    assert not (tmp_path / "b.db").exists()


def test_kktd_serve_listens_beyond_loopback_with_a_token(kktds: list[KktdProcess], tmp_path: Path) -> None:
    import urllib.error
    import urllib.request

    port = free_port()
    kktd = KktdProcess(
        tmp_path / "buffer.db",
        port=port,
        extra_args=["--listen", f"0.0.0.0:{port}", "--api-token-file", str(token_file(tmp_path))],
    )
    kktds.append(kktd)
    kktd.start()
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(f"{kktd.url}/v1/kkt/buffer/status", timeout=10)
    assert refused.value.code == 401
    request = urllib.request.Request(f"{kktd.url}/v1/kkt/buffer/status", headers={"Authorization": f"Bearer {TOKEN}"})
    with urllib.request.urlopen(request, timeout=10) as answer:
        assert answer.status == 200
    assert TOKEN not in kktd.log()


# ---- dead letters: customer contacts ----


async def dead_letter_with_contact(app: Any, key: str, contact: str) -> str:
    body = dict(sample_receipt(key), customer_contact=contact)
    response = await app.client.post(
        "/v1/kkt/receipt",
        json=body,
        headers={"Authorization": f"Bearer {TOKEN}"} if app.services.config.api_token else {},
    )
    receipt_id = (await response.json())["receipt_id"]
    await app.store.settle([Refused(receipt_id, "test", "refused by the access test")])
    return str(receipt_id)


async def test_dead_letters_mask_contacts_without_a_configured_token(app_factory: AppFactory) -> None:
    app = await app_factory()
    await dead_letter_with_contact(app, "dl-1", "buyer@example.ru")
    await dead_letter_with_contact(app, "dl-2", "+79991234567")
    response = await app.client.get("/v1/kkt/dlq")
    listing = await response.json()
    contacts = [letter["receipt"]["customer_contact"] for letter in listing["dead_letters"]]
    assert listing["contacts_masked"] is True
    assert contacts == ["b***@example.ru", "+7999***4567"]
    Contract().check("GET", "/v1/kkt/dlq", response.status, response.content_type, json_bytes(listing))


async def test_dead_letters_show_contacts_to_the_token(app_factory: AppFactory) -> None:
    app = await app_factory(api_token=TOKEN)
    await dead_letter_with_contact(app, "dl-3", "buyer@example.ru")
    response = await app.client.get("/v1/kkt/dlq", headers={"Authorization": f"Bearer {TOKEN}"})
    listing = await response.json()
    assert listing["contacts_masked"] is False
    assert listing["dead_letters"][0]["receipt"]["customer_contact"] == "buyer@example.ru"


def json_bytes(value: Any) -> bytes:
    import json

    return json.dumps(value).encode()


# ---- one receipt and the export: customer contacts ----


async def receipt_with_contact(app: Any, key: str, contact: str, headers: dict[str, str]) -> str:
    response = await app.client.post(
        "/v1/kkt/receipt", json=dict(sample_receipt(key), customer_contact=contact), headers=headers
    )
    assert response.status == 201
    return str((await response.json())["receipt_id"])


async def contacts_seen(app: Any, receipt_id: str, headers: dict[str, str]) -> tuple[str, list[str]]:
    one = await (await app.client.get(f"/v1/kkt/receipt/{receipt_id}", headers=headers)).json()
    exported = await (await app.client.get("/v1/kkt/receipts", headers=headers)).text()
    # Sorted: receipts accepted in the same millisecond export in the order of their ids.
    return one["receipt"]["customer_contact"], sorted(
        json.loads(line)["receipt"]["customer_contact"] for line in exported.splitlines()
    )


async def test_receipt_and_export_mask_contacts_without_a_configured_token(app_factory: AppFactory) -> None:
    app = await app_factory()
    receipt_id = await receipt_with_contact(app, "c-1", "buyer@example.ru", {})
    await receipt_with_contact(app, "c-2", "+79991234567", {})
    assert await contacts_seen(app, receipt_id, {}) == ("b***@example.ru", ["+7999***4567", "b***@example.ru"])


async def test_receipt_and_export_show_contacts_to_the_token(app_factory: AppFactory) -> None:
    app = await app_factory(api_token=TOKEN)
    bearer = {"Authorization": f"Bearer {TOKEN}"}
    receipt_id = await receipt_with_contact(app, "c-3", "buyer@example.ru", bearer)
    assert await contacts_seen(app, receipt_id, bearer) == ("buyer@example.ru", ["buyer@example.ru"])
