"""Health tells the truth about intake: while the database refuses commits /v1/health is 503 error with the
reason, and it turns back to ok once a commit succeeds. On a real small filesystem that fills up.

(A read-only remount cannot be staged here: the kernel refuses to remount a filesystem with files open for
writing. kktd treats SQLITE_READONLY and SQLITE_IOERR like SQLITE_FULL, kktd/store/schema.refuses_writes.)"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from kktd.receipt import sample_receipt
from tests.conftest import App, close_app, open_app
from tests.openapi_contract import Contract
from tests.support import require


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    require(os.geteuid() == 0, "mounting a small tmpfs needs root")
    mount_point = tmp_path / "small"
    mount_point.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount_point)], check=True)
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], check=False)


def fill(directory: Path) -> Path:
    """A file taking every free block of the filesystem."""
    filler = directory / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        while True:
            os.write(fd, b"\0" * 4096)
    except OSError:
        pass
    finally:
        os.close(fd)
    return filler


async def health(app: App) -> tuple[int, dict[str, Any]]:
    response = await app.client.get("/v1/health")
    body = await response.read()
    return response.status, Contract().check("GET", "/v1/health", response.status, response.content_type, body)


async def post(app: App, key: str) -> tuple[int, dict[str, Any]]:
    body = sample_receipt(key)
    body["items"][0]["name"] = f"{key} " + "х" * 100
    response = await app.client.post("/v1/kkt/receipt", json=body)
    return response.status, await response.json()


async def test_full_disk_turns_health_to_error_until_a_commit_succeeds(small_fs: Path) -> None:
    app = await open_app(small_fs)
    try:
        assert (await post(app, "before-0"))[0] == 201
        assert (await health(app))[0] == 200
        filler = fill(small_fs)
        refused = None
        for i in range(2000):
            status, answer = await post(app, f"full-{i}")
            if status == 503:
                refused = answer
                break
        assert refused is not None and refused["error"]["code"] == "storage_unavailable"
        status, report = await health(app)
        assert status == 503 and report["status"] == "error"
        assert any("refuses commits" in problem and "full" in problem for problem in report["problems"])
        # Reads still work meanwhile; health does not flip back on a read.
        assert (await app.client.get("/v1/kkt/buffer/status")).status == 200
        assert (await health(app))[0] == 503

        filler.unlink()
        assert (await post(app, "after-0"))[0] == 201
        status, report = await health(app)
        assert status == 200 and report["status"] == "ok", report
    finally:
        await close_app(app)
