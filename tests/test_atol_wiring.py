"""upstream = atol-online-v5 wired into kktd: its settings in the one option table (file, KKTD_* and flags,
exit 78 naming the key, no secret in check-config), the intake check (422 while the till can fix it), and
`kktd mock-atol`."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import signal
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer

from kktd import cli
from kktd import config as config_module
from kktd.app import assemble
from kktd.errors import ConfigError
from kktd.receipt import sample_receipt
from kktd.upstreams.atol_v5 import AtolOnlineV5, AtolSettings
from kktd_mocks.atol import DEFAULT_GROUP, DEFAULT_INN, DEFAULT_LOGIN, DEFAULT_PASSWORD, start_mock_atol
from tests.conftest import close_app, open_app
from tests.support import KKTD_BIN, Child, free_port

PASSWORD = "S3cret-of-the-shop"


@pytest.fixture
def password_file(tmp_path: Path) -> Path:
    path = tmp_path / "atol_password"
    path.write_text(PASSWORD + "\n")
    return path


def atol_environ(password_file: Path | None, **changes: str) -> dict[str, str]:
    environ = {
        "KKTD_CONFIG": os.devnull,
        "KKTD_UPSTREAM": "atol-online-v5",
        "KKTD_ATOL_LOGIN": "shop-login",
        "KKTD_ATOL_GROUP_CODE": "group-1",
        "KKTD_COMPANY_INN": "5544332219",
        "KKTD_COMPANY_EMAIL": "shop@example.ru",
        "KKTD_COMPANY_PAYMENT_ADDRESS": "https://shop.example.ru",
    }
    if password_file is not None:
        environ["KKTD_ATOL_PASSWORD_FILE"] = str(password_file)
    environ.update(changes)
    return environ


def test_the_settings_come_from_the_environment(password_file: Path) -> None:
    config = config_module.load(
        None, environ=atol_environ(password_file, KKTD_UPSTREAM_CONCURRENCY="9", KKTD_ATOL_TIMEOUT="2s")
    )
    settings = config.upstream_settings
    assert isinstance(settings, AtolSettings)
    assert (settings.login, settings.group_code, settings.password, settings.concurrency, settings.timeout) == (
        "shop-login",
        "group-1",
        PASSWORD,
        9,
        2.0,
    )
    assert settings.url == "https://online.atol.ru/possystem/v5"


def test_flags_override_the_file(tmp_path: Path, password_file: Path) -> None:
    toml = tmp_path / "kktd.toml"
    toml.write_text(
        'upstream = "atol-online-v5"\natol_login = "from-file"\natol_group_code = "g"\n'
        f'atol_password_file = "{password_file}"\ncompany_inn = "7707083893"\n'
        'company_email = "a@b.ru"\ncompany_payment_address = "shop.ru"\n'
    )
    parser = argparse.ArgumentParser()
    config_module.add_arguments(parser)
    args = parser.parse_args(
        [
            "--config",
            str(toml),
            "--atol-login",
            "from-flag",
            "--atol-url",
            "https://fiscalization.evotor.ru/possystem/v5/",
        ]
    )
    settings = config_module.load(args, environ={}).upstream_settings
    assert isinstance(settings, AtolSettings)
    assert (settings.login, settings.company.inn, settings.url) == (
        "from-flag",
        "7707083893",
        "https://fiscalization.evotor.ru/possystem/v5",
    )


def test_the_password_from_systemd_credentials(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "atol_password").write_text(PASSWORD)
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(tmp_path))  # as systemd sets it for LoadCredential=
    config = config_module.load(None, environ=atol_environ(None))
    assert isinstance(config.upstream_settings, AtolSettings)
    assert config.upstream_settings.password == PASSWORD


def test_the_password_is_never_a_setting_of_its_own(tmp_path: Path) -> None:
    keys = {option.key for option in config_module.OPTIONS}
    assert not {"atol_password", "atol_pass", "password"} & keys
    toml = tmp_path / "kktd.toml"
    toml.write_text('atol_password = "x"\n')
    with pytest.raises(ConfigError, match="atol_password .*unknown key"):
        config_module.load(argparse.Namespace(config=str(toml)), environ={})


def test_kktd_ofd_ignores_the_atol_settings(password_file: Path) -> None:
    config = config_module.load(None, environ=atol_environ(password_file, KKTD_UPSTREAM="kktd-ofd"))
    assert not isinstance(config.upstream_settings, AtolSettings)


@pytest.mark.parametrize(
    ("variable", "value", "key"),
    [
        ("KKTD_COMPANY_INN", "5544332218", "company_inn"),
        ("KKTD_COMPANY_INN", "12345", "company_inn"),
        ("KKTD_COMPANY_EMAIL", "shop", "company_email"),
        ("KKTD_ATOL_URL", "online.atol.ru", "atol_url"),
        ("KKTD_ATOL_URL", "https://u:p@online.atol.ru/possystem/v5", "atol_url"),
        ("KKTD_ATOL_LOGIN", "", "atol_login"),
        ("KKTD_ATOL_GROUP_CODE", "a b", "atol_group_code"),
        ("KKTD_UPSTREAM_CONCURRENCY", "0", "upstream_concurrency"),
        ("KKTD_ATOL_TIMEOUT", "never", "atol_timeout"),
        ("KKTD_ATOL_PASSWORD_FILE", "/nonexistent/atol_password", "atol_password_file"),
    ],
)
def test_check_config_exits_78_with_one_line_naming_the_key(
    password_file: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    variable: str,
    value: str,
    key: str,
) -> None:
    for name, setting in atol_environ(password_file, **{variable: value}).items():
        monkeypatch.setenv(name, setting)
    assert cli.main(["check-config"]) == cli.EX_CONFIG
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert err.startswith(f"kktd: configuration error: {key}")
    assert err[len(f"kktd: configuration error: {key}")] in " :"
    assert PASSWORD not in err


def test_check_config_reports_every_problem_in_one_run(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Configuring ATOL from nothing takes one run: each missing key and each wrong value, one line each."""
    for name in [n for n in os.environ if n.startswith("KKTD_") or n == "CREDENTIALS_DIRECTORY"]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("KKTD_UPSTREAM", "atol-online-v5")
    monkeypatch.setenv("KKTD_ATOL_TIMEOUT", "never")
    monkeypatch.setenv("KKTD_LISTEN", "http://127.0.0.1:1")
    assert cli.main(["check-config", "--config", os.devnull]) == cli.EX_CONFIG
    lines = capsys.readouterr().err.splitlines()
    keys = [line.removeprefix("kktd: configuration error: ").split(" ")[0].rstrip(":") for line in lines]
    assert all(line.startswith("kktd: configuration error: ") for line in lines), lines
    assert sorted(keys) == sorted(
        [
            "listen",
            "atol_timeout",
            "atol_login",
            "atol_group_code",
            "company_inn",
            "company_email",
            "company_payment_address",
            "atol_password_file",
        ]
    ), lines
    listen = lines[keys.index("listen")]
    assert "expected HOST:PORT, not a URL" in listen and "beyond loopback" not in listen


def test_check_config_shows_the_settings_but_never_the_password(
    password_file: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    for name, setting in atol_environ(password_file).items():
        monkeypatch.setenv(name, setting)
    assert cli.main(["check-config"]) == cli.EX_OK
    out = capsys.readouterr().out
    shown = json.loads(out)
    assert shown["upstream"] == "atol-online-v5" and shown["atol_login"] == "shop-login"
    assert shown["atol_password"] == "***" and shown["atol_password_file"] == str(password_file)
    assert PASSWORD not in out


# ---- intake ----


@pytest.fixture
async def atol_kktd(tmp_path: Path, password_file: Path) -> AsyncIterator[TestClient]:
    async with open_atol_kktd(tmp_path) as client:
        yield client


@asynccontextmanager
async def open_atol_kktd(tmp_path: Path) -> AsyncIterator[TestClient]:
    """kktd with upstream = atol-online-v5 (and its mock) on tmp_path's database."""
    async with AsyncExitStack() as stack:
        mock = await start_mock_atol()
        stack.push_async_callback(mock.close)
        mock_password = tmp_path / "mock_password"
        mock_password.write_text(DEFAULT_PASSWORD)
        environ = atol_environ(
            mock_password,
            KKTD_ATOL_URL=mock.url,
            KKTD_ATOL_LOGIN=DEFAULT_LOGIN,
            KKTD_ATOL_GROUP_CODE=DEFAULT_GROUP,
            KKTD_COMPANY_INN=DEFAULT_INN,
        )
        config = dataclasses.replace(config_module.load(None, environ=environ), db=tmp_path / "buffer.db")
        kktd = await assemble(config, stack)
        assert isinstance(kktd.upstream, AtolOnlineV5)
        client = TestClient(TestServer(kktd.web_app))
        await client.start_server()
        stack.push_async_callback(client.close)
        yield client


def _with_contact(key: str, **changes: Any) -> dict[str, Any]:
    body = sample_receipt(key)
    body["customer_contact"] = "+79991234567"
    body.update(changes)
    return body


async def test_intake_accepts_a_receipt_atol_can_take(atol_kktd: TestClient) -> None:
    response = await atol_kktd.post("/v1/kkt/receipt", json=_with_contact("ok-1"))
    assert response.status == 201, await response.text()


@pytest.mark.parametrize(
    ("changes", "code", "field"),
    [
        ({"customer_contact": None}, "customer_contact_required", "customer_contact"),
        (
            {
                "items": [
                    {
                        "name": "Станок",
                        "price": 4_294_967_296,
                        "quantity": "1",
                        "vat": "vat20",
                        "payment_method": "full_payment",
                        "payment_object": "commodity",
                    }
                ],
                "payments": [{"type": "electronic", "amount": 4_294_967_296}],
            },
            "amount_out_of_range",
            "items[0].price",
        ),
        (
            {
                "items": [
                    {
                        "name": "Гвозди",
                        "price": 1,
                        "quantity": "100000",
                        "vat": "vat20",
                        "measure": "gram",
                        "payment_method": "full_payment",
                        "payment_object": "commodity",
                    }
                ],
                "payments": [{"type": "cash", "amount": 100000}],
            },
            "quantity_out_of_range",
            "items[0].quantity",
        ),
    ],
)
async def test_intake_refuses_what_atol_is_certain_to_refuse(
    atol_kktd: TestClient, changes: dict[str, Any], code: str, field: str
) -> None:
    body = {k: v for k, v in _with_contact("bad-1", **changes).items() if v is not None}
    response = await atol_kktd.post("/v1/kkt/receipt", json=body)
    assert response.status == 422
    error = (await response.json())["error"]
    assert (error["code"], error["field"]) == (code, field)
    status = await (await atol_kktd.get("/v1/kkt/buffer/status")).json()
    assert status["counts"] == {"pending": 0, "submitted": 0, "sent": 0, "failed": 0, "resolved": 0}  # nothing stored


async def test_a_replay_after_the_switch_to_atol_answers_as_the_stored_receipt(tmp_path: Path) -> None:
    """A receipt kktd-ofd took (no contact, which ATOL refuses), posted again with its key after the daemon
    was switched to atol-online-v5: the stored receipt answers (200), the new upstream's intake rule does
    not; a different body under that key is the key's conflict (409); a new key is refused (422)."""
    plain = sample_receipt("switched-1")
    before = await open_app(tmp_path)
    try:
        stored = await before.client.post("/v1/kkt/receipt", json=plain)
        assert stored.status == 201
        first = await stored.json()
    finally:
        await close_app(before)
    async with open_atol_kktd(tmp_path) as atol_kktd:
        replay = await atol_kktd.post("/v1/kkt/receipt", json=plain)
        assert replay.status == 200, await replay.text()
        assert await replay.json() == first
        other = await atol_kktd.post("/v1/kkt/receipt", json=dict(plain, pos_id="POS-OTHER"))
        assert other.status == 409
        assert (await other.json())["error"]["code"] == "idempotency_conflict"
        new = await atol_kktd.post("/v1/kkt/receipt", json=sample_receipt("switched-2"))
        assert new.status == 422
        assert (await new.json())["error"]["code"] == "customer_contact_required"


async def test_intake_without_atol_takes_a_receipt_without_contact(app: Any) -> None:
    response = await app.client.post("/v1/kkt/receipt", json=sample_receipt("plain-1"))
    assert response.status == 201


# ---- the command ----


def test_kktd_mock_atol_serves_until_sigterm(tmp_path: Path) -> None:
    port = free_port()
    argv = [str(KKTD_BIN), "mock-atol", "--listen", f"127.0.0.1:{port}"]
    mock = Child("kktd mock-atol", argv, tmp_path / "mock-atol.log").start()
    try:
        mock.wait_until(lambda: "atol_password_file" in mock.log(), 30, "its settings printed")
        # Everything kktd needs to talk to it, the password too (a mock's, printed so nobody reads the source).
        assert f"atol_url = http://127.0.0.1:{port}/possystem/v5," in mock.log()
        assert f"password {DEFAULT_PASSWORD}" in mock.log() and f"atol_login = {DEFAULT_LOGIN}" in mock.log()
        assert f"atol_group_code = {DEFAULT_GROUP}" in mock.log() and f"company_inn = {DEFAULT_INN}" in mock.log()
        mock.signal(signal.SIGTERM)
        assert mock.wait(10) == 0
    finally:
        mock.stop()


def test_kktd_help_lists_mock_atol(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    assert "mock-atol" in capsys.readouterr().out
