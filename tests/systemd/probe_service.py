"""A stand-in for kktd run under kktd.service's full hardening (ExecStart swapped by a test drop-in).

It exercises what kktd's process needs from the sandbox the unit builds: aiohttp, yarl, multidict,
frozenlist and propcache through their C extensions (MemoryDenyWriteExecute= must not break them), SQLite
in WAL mode in $STATE_DIRECTORY, a TCP listener, sd_notify READY/STATUS, and it reports what it can write.
GET /probe answers a JSON report; the test asserts on it.
"""

from __future__ import annotations

import asyncio
import errno
import importlib
import os
import sqlite3
import sys
from pathlib import Path
from typing import Any

import sdnotify  # type: ignore[import-untyped]  # no stubs; kktd uses it the same way
from aiohttp import web

C_EXTENSIONS = (
    "aiohttp._http_parser",
    "aiohttp._http_writer",
    "multidict._multidict",
    "yarl._quoting_c",
    "frozenlist._frozenlist",
    "propcache._helpers_c",
)
WRITE_TARGETS = ("/etc", "/opt", "/usr", "/var/lib", "/root", "/home")
# Writable but private to the service (PrivateTmp=): the marker stays so the test can look for it outside.
PRIVATE_TMP = ("/tmp", "/var/tmp")
MARKER = "kktd-probe-private-marker"


def c_extensions() -> dict[str, str]:
    loaded: dict[str, str] = {}
    for name in C_EXTENSIONS:
        try:
            module = importlib.import_module(name)
            loaded[name] = str(module.__file__)
        except ImportError as exc:
            loaded[name] = f"error: {exc}"
    # aiohttp silently falls back to its pure-Python parser if the C one cannot load: check which is used.
    from aiohttp import http_parser

    loaded["aiohttp.HttpRequestParser"] = http_parser.HttpRequestParser.__module__
    return loaded


def try_write(directory: str) -> str:
    target = Path(directory) / f"kktd-probe-{os.getpid()}"
    try:
        target.write_text("probe")
    except OSError as exc:
        return errno.errorcode.get(exc.errno or 0, str(exc.errno))
    target.unlink()
    return "written"


def leave_marker(directory: str) -> str:
    try:
        (Path(directory) / MARKER).write_text("probe")
    except OSError as exc:
        return errno.errorcode.get(exc.errno or 0, str(exc.errno))
    return "written"


def sqlite_wal(state_dir: Path) -> dict[str, Any]:
    db = sqlite3.connect(state_dir / "probe.db")
    try:
        mode = db.execute("PRAGMA journal_mode=WAL").fetchone()[0]
        db.execute("PRAGMA synchronous=FULL")
        db.execute("CREATE TABLE IF NOT EXISTS t (v TEXT)")
        with db:
            db.execute("INSERT INTO t VALUES ('x')")
        rows = db.execute("SELECT count(*) FROM t").fetchone()[0]
    finally:
        db.close()
    mode_bits = oct((state_dir / "probe.db").stat().st_mode & 0o777)
    return {"journal_mode": mode, "rows": rows, "file_mode": mode_bits}


async def report(_request: web.Request) -> web.Response:
    state_dir = Path(os.environ["STATE_DIRECTORY"])
    body = {
        "uid": os.getuid(),
        "euid": os.geteuid(),
        "state_directory": str(state_dir),
        "state_dir_write": try_write(str(state_dir)),
        "writes": {d: try_write(d) for d in WRITE_TARGETS},
        "private_tmp": {d: leave_marker(d) for d in PRIVATE_TMP},
        "c_extensions": c_extensions(),
        "sqlite": sqlite_wal(state_dir),
    }
    return web.json_response(body)


async def serve(host: str, port: int) -> None:
    app = web.Application()
    app.router.add_get("/probe", report)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, host, port).start()
    notifier = sdnotify.SystemdNotifier()
    notifier.notify("READY=1\nSTATUS=probe listening")
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(15, stop.set)
    await stop.wait()
    notifier.notify("STOPPING=1")
    await runner.cleanup()


def main() -> int:
    host, _, port = os.environ["KKTD_LISTEN"].rpartition(":")
    asyncio.run(serve(host, int(port)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
