"""Fixtures for in-process tests: kktd assembled by kktd.app.assemble (as the daemon does) on a temporary
database, behind a real aiohttp test server."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any, Protocol

import pytest
from aiohttp.test_utils import TestClient, TestServer

from kktd import config as config_module
from kktd.api import Services
from kktd.app import Assembled, assemble
from kktd.clock import Clock, Sleep
from kktd.config import Config
from kktd.store import Store
from kktd.upstreams.kktd_ofd import KktdOfdSettings
from kktd_mocks.atol import MockAtol, start_mock_atol
from kktd_mocks.ofd import MockOfd, start_mock_ofd
from tests.atol_support import MockAtolProcess
from tests.faulty_kktd import add_fault_routes
from tests.support import KktdProcess, MockOfdProcess

UPSTREAM_FIELDS = {"ofd_url": "url", "ofd_timeout": "timeout"}


def make_config(tmp_path: Path, **overrides: Any) -> Config:
    """The default configuration on a database under tmp_path; `ofd_url` / `ofd_timeout` set the kktd-ofd
    upstream's own settings, every other keyword a Config field (`upstream` with its `upstream_settings`
    chooses another upstream)."""
    base = config_module.load(None, environ={"KKTD_CONFIG": os.devnull})
    upstream = {UPSTREAM_FIELDS[key]: overrides.pop(key) for key in list(overrides) if key in UPSTREAM_FIELDS}
    settings = base.upstream_settings
    assert isinstance(settings, KktdOfdSettings)
    chosen = overrides.pop("upstream_settings", None) or dataclasses.replace(settings, **upstream)
    return dataclasses.replace(base, db=tmp_path / "buffer.db", upstream_settings=chosen, **overrides)


@dataclasses.dataclass
class App:
    client: TestClient
    kktd: Assembled
    stack: AsyncExitStack

    @property
    def services(self) -> Services:
        return self.kktd.services

    @property
    def store(self) -> Store:
        return self.kktd.store

    async def row_count(self) -> int:
        return await self.store.run(_count_rows)


async def _count_rows(conn: Any) -> int:
    async with conn.execute("SELECT count(*) FROM receipts") as cursor:
        row = await cursor.fetchone()
        return int(row[0])


async def open_app(
    tmp_path: Path, faults: bool = False, clock: Clock = time.monotonic, sleep: Sleep = asyncio.sleep, **overrides: Any
) -> App:
    """kktd in process, its sync loop assembled but not running (tests drive it); `clock` and `sleep` go
    to the loop and the breaker (tests.support.FakeTime makes their waits instant)."""
    config = make_config(tmp_path, **overrides)
    stack = AsyncExitStack()
    kktd = await assemble(config, stack, clock=clock, sleep=sleep)
    if faults:
        add_fault_routes(kktd.web_app, kktd.services)
    server = TestServer(kktd.web_app)
    # As the daemon serves it (kktd.server.runner_options): no decompression by aiohttp.
    await server.start_server(auto_decompress=False)
    client = TestClient(server)
    await client.start_server()
    return App(client, kktd, stack)


async def close_app(app: App) -> None:
    await app.client.close()
    await app.stack.aclose()


class AppFactory(Protocol):
    async def __call__(self, faults: bool = False, clock: Clock = ..., sleep: Sleep = ..., **overrides: Any) -> App: ...


@pytest.fixture
async def app_factory(tmp_path: Path) -> AsyncIterator[AppFactory]:
    """Opens in-process kktds (on tmp_path's database); all are closed after the test."""
    opened: list[App] = []

    async def factory(
        faults: bool = False, clock: Clock = time.monotonic, sleep: Sleep = asyncio.sleep, **overrides: Any
    ) -> App:
        application = await open_app(tmp_path, faults, clock, sleep, **overrides)
        opened.append(application)
        return application

    try:
        yield factory
    finally:
        for application in reversed(opened):
            await close_app(application)


@pytest.fixture
async def app(app_factory: AppFactory) -> App:
    return await app_factory()


@pytest.fixture
def kktds() -> Iterator[list[KktdProcess]]:
    """kktd processes a test starts: whatever state the test leaves them in, none outlives it."""
    started: list[KktdProcess] = []
    try:
        yield started
    finally:
        for proc in started:
            proc.stop()


@pytest.fixture(scope="module")
def module_kktd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KktdProcess]:
    """One kktd process (embedded mock) shared by a module's tests: the live fuzzers post thousands to it."""
    kktd = KktdProcess(tmp_path_factory.mktemp("kktd") / "buffer.db", env={"KKTD_LOG_LEVEL": "info"}).start()
    try:
        yield kktd
    finally:
        kktd.stop()


@pytest.fixture
async def mock_ofd() -> AsyncIterator[MockOfd]:
    """The mock OFD in this event loop (kktd_mocks/ofd.py), seeded so its flaky mode repeats; closed after."""
    ofd = await start_mock_ofd("127.0.0.1", 0, seed=1)
    try:
        yield ofd
    finally:
        await ofd.close()


class MockAtols:
    """Starts ATOL mocks in the test's event loop (kktd_mocks/atol.py; `options` as start_mock_atol's) and
    remembers them: the fixture closes every one, and `tokens()` is every token they issued, which the
    adapter's tests look for in the logs."""

    def __init__(self) -> None:
        self.started: list[MockAtol] = []

    async def __call__(self, **options: Any) -> MockAtol:
        mock = await start_mock_atol("127.0.0.1", 0, **options)
        self.started.append(mock)
        return mock

    def tokens(self) -> set[str]:
        return {token for mock in self.started for token in mock.state.tokens}


@pytest.fixture
async def mock_atols() -> AsyncIterator[MockAtols]:
    mocks = MockAtols()
    try:
        yield mocks
    finally:
        for mock in mocks.started:
            await mock.close()


@pytest.fixture
def ofd_process(tmp_path: Path) -> Iterator[MockOfdProcess]:
    """`kktd mock-ofd` as its own process, its store in tmp_path/ofd.db (it outlives any kktd crash)."""
    ofd = MockOfdProcess(workdir=tmp_path, db=tmp_path / "ofd.db").start()
    try:
        yield ofd
    finally:
        ofd.stop()


@pytest.fixture
def atol_process(tmp_path: Path) -> Iterator[MockAtolProcess]:
    """`kktd mock-atol` as its own process, not started yet: the test starts it with the behaviour it needs
    (`atol_process.start(**behaviour)`); stopped after the test whatever its state."""
    atol = MockAtolProcess(tmp_path)
    try:
        yield atol
    finally:
        atol.stop()
