"""Fixtures for in-process tests: a real buffer on a temporary database behind the real aiohttp app."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any, AsyncIterator, Iterator

import pytest
from aiohttp.test_utils import TestClient, TestServer

from kktd import config as config_module
from kktd.api import Services, create_app
from kktd.buffer import Buffer
from kktd.config import Config
from tests.support import KktdProcess


def make_config(tmp_path: Path, **overrides: Any) -> Config:
    base = config_module.load(None, environ={"KKTD_CONFIG": os.devnull})
    return dataclasses.replace(base, db=tmp_path / "buffer.db", **overrides)


@dataclasses.dataclass
class App:
    client: TestClient
    services: Services

    @property
    def buffer(self) -> Buffer:
        return self.services.buffer

    async def row_count(self) -> int:
        row = await self.buffer._call(lambda conn: _count_rows(conn))
        return int(row)


async def _count_rows(conn: Any) -> int:
    async with conn.execute("SELECT count(*) FROM receipts") as cursor:
        row = await cursor.fetchone()
        return int(row[0])


async def open_app(tmp_path: Path, faults: bool = False, **overrides: Any) -> App:
    config = make_config(tmp_path, **overrides)
    buffer = await Buffer.open(config.db, config.max_pending)
    services = Services(config, buffer, faults_enabled=faults)
    client = TestClient(TestServer(create_app(services)))
    await client.start_server()
    return App(client, services)


async def close_app(app: App) -> None:
    await app.client.close()
    await app.buffer.close()


@pytest.fixture
async def app(tmp_path: Path) -> AsyncIterator[App]:
    application = await open_app(tmp_path)
    try:
        yield application
    finally:
        await close_app(application)


@pytest.fixture
def kktds() -> Iterator[list[KktdProcess]]:
    """kktd processes a test starts: whatever state the test leaves them in, none outlives it."""
    started: list[KktdProcess] = []
    try:
        yield started
    finally:
        for proc in started:
            proc.stop()
