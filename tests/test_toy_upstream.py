"""An upstream really is one module, its mock and one registry entry (docs/upstreams.md).

The test copies kktd/ and kktd_mocks/ to a temporary tree, adds a toy upstream there the way a developer
would (a module in kktd/upstreams/, a mock in kktd_mocks/, an entry in the registry), checks that nothing
else differs from the checkout, and runs that tree's kktd: its settings are options of `kktd serve` and
`kktd check-config`, its mock is `kktd mock-toy` and `--embedded-mock`, its intake check refuses at intake,
its delivery traits reach the loop, and receipts are fiscalized through it exactly once.

A second test scans the daemon's code: no upstream's name appears outside its own modules and the registry.
"""

from __future__ import annotations

import filecmp
import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from kktd.receipt import sample_receipt
from kktd.upstreams import REGISTRY
from tests.runner import Child
from tests.support import free_port, http, wait_until

# Starts kktd, a mock or another program as a process: the rest of `make test`, not the fast tier.
pytestmark = pytest.mark.process

CHECKOUT = Path(__file__).resolve().parent.parent

TOY_MODULE = '''"""The toy upstream: one phase, one call in flight, a JSON list in, a list of fiscal signs out."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import aiohttp
import yarl

from kktd.delivery import (AwaitingResult, DeliveryTraits, FailureKind, FiscalData, Fiscalized, Outgoing,
                           PollOutcome, SubmitOutcome, UpstreamUnavailable)
from kktd.options import Option, duration_in, http_url
from kktd.receipt import ReceiptInvalid
from kktd.seller import Seller
from kktd.upstreams.http import HttpUpstream, bad_answer

NAME = "toy"
TRAITS = DeliveryTraits(max_in_flight=1, poll_interval_s=0.5)
OPTIONS = (
    Option("toy_url", http_url, "http://127.0.0.1:9", "base URL of the toy register (upstream toy)"),
    Option("toy_timeout", duration_in(0.05, 60), 2.0, "timeout of one toy request (upstream toy)"),
)


@dataclass(frozen=True)
class ToySettings:
    url: str
    timeout: float
    seller_inn: str

    def describe(self) -> dict[str, Any]:
        return {"toy_url": self.url, "toy_timeout": self.timeout}


def settings(values: Mapping[str, Any], seller: Seller) -> ToySettings:
    (inn,) = seller.required(NAME, ("company_inn",))
    return ToySettings(values["toy_url"], values["toy_timeout"], inn)


def intake_check(receipt: Mapping[str, Any]) -> None:
    if receipt["pos_id"] == "TOY-REFUSES":
        raise ReceiptInvalid("toy_refuses", "the toy register refuses this till", "pos_id")


class ToyUpstream(HttpUpstream):
    name: ClassVar[str] = NAME
    two_phase: ClassVar[bool] = False
    max_batch = 10

    def __init__(self, settings: ToySettings) -> None:
        self._settings = settings
        self._url = yarl.URL(settings.url) / "fiscalize"
        self._timeout = aiohttp.ClientTimeout(total=settings.timeout)
        self._connection_limit = 1
        self._max_answer_bytes = 1 << 16

    async def submit(self, batch: Sequence[Outgoing]) -> list[SubmitOutcome]:
        body = json.dumps({"inn": self._settings.seller_inn,
                           "receipts": [{"key": r.external_id, "id": r.receipt_id} for r in batch]}).encode()
        answer = await self._exchange("POST", self._url, body, {"Content-Type": "application/json"})
        if answer.status != 200:
            raise UpstreamUnavailable(FailureKind.MAYBE_SENT, f"http_{answer.status}")
        try:
            signs = json.loads(answer.body)["signs"]
        except (ValueError, KeyError, TypeError):
            raise bad_answer("shape") from None
        if not isinstance(signs, list) or len(signs) != len(batch):
            raise bad_answer("length_mismatch")
        return [Fiscalized(r.receipt_id, FiscalData(n, str(sign), "2026-12-07T10:00:00Z"))
                for r, (n, sign) in zip(batch, signs)]

    async def poll(self, awaiting: Sequence[AwaitingResult]) -> list[PollOutcome]:
        raise TypeError("one phase")


def create(settings: ToySettings) -> ToyUpstream:
    return ToyUpstream(settings)
'''

TOY_MOCK = '''"""The toy register's mock: deduplicates on the key, answers one fiscal sign per receipt."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
from collections.abc import Sequence

from aiohttp import web

from kktd.upstreams import EmbeddedMock
from kktd.upstreams.toy import ToySettings

STATE = web.AppKey("state", dict)


async def fiscalize(request: web.Request) -> web.Response:
    signs: dict[str, int] = request.app[STATE]
    body = await request.json()
    answer = []
    for receipt in body["receipts"]:
        number = signs.setdefault(receipt["key"], len(signs) + 1)
        answer.append([number, 1000 + number])
    return web.json_response({"signs": answer})


async def stats(request: web.Request) -> web.Response:
    return web.json_response({"unique": len(request.app[STATE])})


async def start(port: int = 0) -> tuple[web.AppRunner, str]:
    app = web.Application()
    app[STATE] = {}
    app.add_routes([web.post("/fiscalize", fiscalize), web.get("/stats", stats)])
    runner = web.AppRunner(app, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", port)
    await site.start()
    return runner, f"http://127.0.0.1:{runner.addresses[0][1]}"


async def start_embedded(settings: ToySettings) -> EmbeddedMock:
    runner, url = await start()
    return EmbeddedMock(dataclasses.replace(settings, url=url), f"toy mock on {url}", runner.cleanup)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="kktd mock-toy", description="The toy register's mock.")
    parser.add_argument("--port", type=int, default=0)
    parser.parse_args(argv)
    return 0
'''

TOY_ENTRY = """        UpstreamSpec(toy.NAME, toy.OPTIONS, toy.settings, toy.create, toy.intake_check, toy.TRAITS,
                     mock=MockSpec("mock-toy", "kktd_mocks.toy", "run the toy register's mock")),
"""


def _copy(source: Path, target: Path) -> None:
    shutil.copytree(source, target, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))


def _differing(left: Path, right: Path) -> set[str]:
    """Paths (relative) that exist on one side only or differ in content."""
    result: set[str] = set()

    def walk(cmp: filecmp.dircmp[str], prefix: str) -> None:
        result.update(prefix + name for name in cmp.left_only + cmp.right_only + cmp.diff_files)
        for name, sub in cmp.subdirs.items():
            walk(sub, f"{prefix}{name}/")

    walk(filecmp.dircmp(left, right, ignore=["__pycache__"]), "")
    return result


@pytest.fixture(scope="module")
def toy_tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("toy-tree")
    for package in ("kktd", "kktd_mocks"):
        _copy(CHECKOUT / package, root / package)
    (root / "kktd" / "upstreams" / "toy.py").write_text(TOY_MODULE)
    (root / "kktd_mocks" / "toy.py").write_text(TOY_MOCK)
    registry = root / "kktd" / "upstreams" / "__init__.py"
    text = registry.read_text()
    imports = "from kktd.upstreams import atol_driver, atol_v5, kktd_ofd\n"
    closing = "    )\n}\nDEFAULT_UPSTREAM"
    assert imports in text and closing in text, "the registry's shape changed: update this test"
    text = text.replace(imports, "from kktd.upstreams import atol_driver, atol_v5, kktd_ofd, toy\n")
    text = text.replace(closing, TOY_ENTRY + closing)
    registry.write_text(text)
    return root


def _kktd(tree: Path, *args: str, **popen: object) -> subprocess.Popen[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("KKTD_") and k != "NOTIFY_SOCKET"}
    env["PYTHONPATH"] = str(tree)
    return subprocess.Popen(
        [sys.executable, "-m", "kktd", *args],
        cwd=tree,
        env=env,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        **popen,
    )  # type: ignore[call-overload]


def _run(tree: Path, *args: str) -> tuple[int, str]:
    proc = _kktd(tree, *args)
    out, _ = proc.communicate(timeout=60)
    return proc.returncode, out


def test_adding_the_toy_touches_only_its_module_its_mock_and_the_registry(toy_tree: Path) -> None:
    changed = _differing(CHECKOUT / "kktd", toy_tree / "kktd") | {
        f"../kktd_mocks/{name}" for name in _differing(CHECKOUT / "kktd_mocks", toy_tree / "kktd_mocks")
    }
    assert changed == {"upstreams/toy.py", "upstreams/__init__.py", "../kktd_mocks/toy.py"}


def test_the_toy_settings_are_kktd_settings(toy_tree: Path, tmp_path: Path) -> None:
    def check_config(*flags: str) -> tuple[int, str]:
        return _run(toy_tree, "check-config", "--upstream", "toy", "--db", str(tmp_path / "b.db"), *flags)

    code, out = check_config("--company-inn", "7707083893", "--toy-timeout", "3s")
    assert code == 0, out
    described = json.loads(out)
    assert (described["upstream"], described["toy_timeout"], described["company_inn"]) == ("toy", 3.0, "7707083893")
    code, out = check_config()
    assert code == 78 and "company_inn: required when upstream = toy" in out, out
    code, out = check_config("--company-inn", "7707083893", "--toy-url", "gopher://x")
    assert code == 78 and "toy_url" in out, out
    code, out = _run(toy_tree, "mock-toy", "--help")
    assert code == 0 and "kktd mock-toy" in out, out


@pytest.fixture
def toy_kktd(toy_tree: Path, tmp_path: Path) -> Iterator[str]:
    port = free_port()
    args = [
        "serve",
        "--upstream",
        "toy",
        "--embedded-mock",
        "--company-inn",
        "7707083893",
        "--db",
        str(tmp_path / "buffer.db"),
        "--listen",
        f"127.0.0.1:{port}",
        "--sync-interval",
        "0.05",
    ]
    env = {k: v for k, v in os.environ.items() if not k.startswith("KKTD_") and k != "NOTIFY_SOCKET"}
    env["PYTHONPATH"] = str(toy_tree)
    kktd = Child("the toy kktd", [sys.executable, "-m", "kktd", *args], tmp_path / "toy-kktd.log", env, toy_tree)
    url = f"http://127.0.0.1:{port}"
    try:
        kktd.start().wait_until(lambda: _health(url), 30, "to serve")
        yield url
    finally:
        kktd.stop(10)


def _health(url: str) -> bool:
    try:
        return http("GET", f"{url}/v1/health")[0] == 200
    except OSError:
        return False


def test_receipts_are_fiscalized_through_the_toy_once(toy_kktd: str) -> None:
    ids = []
    for n in range(5):
        code, answer = http("POST", f"{toy_kktd}/v1/kkt/receipt", sample_receipt(f"toy-{n}"))
        assert code == 201, answer
        ids.append(answer["receipt_id"])
    code, refused = http("POST", f"{toy_kktd}/v1/kkt/receipt", sample_receipt("toy-refused", pos_id="TOY-REFUSES"))
    assert code == 422 and refused["error"]["code"] == "toy_refuses", refused
    wait_until(
        lambda: http("GET", f"{toy_kktd}/v1/kkt/buffer/status")[1]["counts"]["sent"] == 5,
        30,
        "five receipts sent through the toy",
    )
    code, status = http("GET", f"{toy_kktd}/v1/kkt/buffer/status")
    assert status["sync"]["upstream"] == "toy" and status["counts"]["pending"] == 0
    numbers = {http("GET", f"{toy_kktd}/v1/kkt/receipt/{rid}")[1]["ofd"]["fiscal_document_number"] for rid in ids}
    assert numbers == {1, 2, 3, 4, 5}  # one document per receipt: none twice, none lost
    # Replaying a key answers the stored receipt and makes no second document.
    code, again = http("POST", f"{toy_kktd}/v1/kkt/receipt", sample_receipt("toy-0"))
    assert code == 200 and again["receipt_id"] == ids[0]


def test_no_upstream_name_outside_its_modules_and_the_registry() -> None:
    """Every name an upstream is known by (its registry name, its module's, its mock's) and the vendors'
    names appear in kktd/ only in that upstream's own modules and in the registry."""
    owned: set[str] = set()  # the upstreams' module names: kktd/upstreams/MODULE*.py are theirs
    words: set[str] = {"atol", "evotor"}  # brands, whatever the upstream is called
    for spec in REGISTRY.values():
        module = spec.create.__module__.rsplit(".", 1)[1]
        owned.add(module)
        words |= {spec.name, module}
        if spec.mock is not None:
            words.add(spec.mock.command)
    pattern = re.compile("|".join(re.escape(w) for w in sorted(words, key=len, reverse=True)), re.IGNORECASE)
    found = []
    for path in sorted((CHECKOUT / "kktd").rglob("*")):
        if path.suffix not in (".py", ".yaml", ".json") or "__pycache__" in path.parts:
            continue
        relative = path.relative_to(CHECKOUT / "kktd").as_posix()
        if relative == "upstreams/__init__.py" or any(relative.startswith(f"upstreams/{module}") for module in owned):
            continue
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if pattern.search(line):
                found.append(f"kktd/{relative}:{number}: {line.strip()}")
    assert not found, "upstream names outside their modules:\n" + "\n".join(found)
