"""The seller and terminal settings are kktd's own (kktd/seller.py): parsed once, required by the upstreams that
send them, shown by check-config, reloaded with the upstream that uses them, and the default cashier applied
when a receipt names none."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from kktd import config as config_module
from kktd.errors import ConfigError
from kktd.receipt import sample_receipt, validate_receipt
from kktd.reload import plan
from kktd.seller import Seller, parse_seller
from kktd.upstreams.atol_v5_mapping import Company, registration_document
from tests.conftest import make_config

INN = "7707083893"
CASHIER_INN = "500100732259"


def test_unset_and_empty_are_the_same() -> None:
    assert parse_seller({}) == parse_seller({key: "" for key in ("company_inn", "cashier_name")}) == Seller()


def test_each_bad_value_names_its_key() -> None:
    for key, value in (
        ("company_inn", "5544332218"),
        ("company_email", "shop"),
        ("cashier_name", " "),
        ("cashier_inn", "7707083893"),
        ("company_payment_address", "x" * 257),
    ):
        with pytest.raises(ConfigError) as caught:
            parse_seller({key: value, "cashier_name": "Ivanova A. A."} if key == "cashier_inn" else {key: value})
        assert str(caught.value).startswith(f"{key} = "), caught.value


def test_a_cashier_inn_needs_the_cashier_it_belongs_to() -> None:
    with pytest.raises(ConfigError, match="^cashier_inn: set only with cashier_name"):
        parse_seller({"cashier_inn": CASHIER_INN})


def test_required_names_the_first_missing_key() -> None:
    seller = Seller(company_inn=INN)
    assert seller.required("x", ("company_inn",)) == (INN,)
    with pytest.raises(ConfigError, match="^company_email: required when upstream = x$"):
        seller.required("x", ("company_inn", "company_email"))


def test_check_config_shows_the_seller_for_every_upstream(tmp_path: Path) -> None:
    environ = {
        "KKTD_CONFIG": "/dev/null",
        "KKTD_DB": str(tmp_path / "b.db"),
        "KKTD_COMPANY_INN": INN,
        "KKTD_CASHIER_NAME": "Ivanova A. A.",
    }
    described = config_module.load(None, environ=environ).describe()
    assert (described["company_inn"], described["cashier_name"], described["cashier_inn"]) == (
        INN,
        "Ivanova A. A.",
        None,
    )
    json.dumps(described)  # printable as check-config prints it


def _mapped(receipt: dict[str, object], company: Company) -> dict[str, object]:
    document = registration_document(validate_receipt(receipt).canonical, "key", 0, company)
    body = document["receipt"]
    assert isinstance(body, dict)
    return body


def test_the_default_cashier_goes_out_only_when_the_receipt_names_none() -> None:
    company = Company(INN, "shop@example.ru", "https://shop.example.ru", "Ivanova A. A.", CASHIER_INN)
    without = _mapped(sample_receipt("k-1"), company)
    assert (without["cashier"], without["cashier_inn"]) == ("Ivanova A. A.", CASHIER_INN)
    named = dict(sample_receipt("k-2"), cashier={"name": "Petrov P. P."})
    body = _mapped(named, company)
    assert body["cashier"] == "Petrov P. P." and "cashier_inn" not in body
    plain = _mapped(sample_receipt("k-3"), Company(INN, "shop@example.ru", "https://shop.example.ru"))
    assert "cashier" not in plain and "cashier_inn" not in plain


def test_a_seller_change_the_upstream_does_not_send_is_shown_and_applied_live(tmp_path: Path) -> None:
    old = make_config(tmp_path)
    new = dataclasses.replace(old, seller=Seller(company_inn=INN))
    reload = plan(old, new)
    assert [(c.key, c.old, c.new) for c in reload.live] == [("company_inn", "None", INN)]
    assert not reload.needs_restart and reload.effective.seller == Seller(company_inn=INN)
