"""kktd with test-only fault hooks: `python -m tests.faulty_kktd serve ...` (the checkout on sys.path).

The product has no fault hooks at all; this entry point adds `POST /v1/test/fault` to the assembled daemon
before it serves. Faults:
- ``wedge_writer``: a job that never finishes is submitted to the store's writer, as if the disk hung (the
  way Home Assistant's tests block its recorder); every later database operation waits behind it.
- ``block_loop``: the event loop is blocked for an hour (the watchdog must catch it).

And one probe for what the product shows only in its log: ``GET /v1/test/integrity`` answers whether the
integrity check deferred until after start-up has finished (``{"finished": bool, "damage": str | null}``),
so a test can wait for it instead of for a log line.
"""

from __future__ import annotations

import asyncio
import logging
import sys
import time
from typing import Any

from aiohttp import web

from kktd import cli
from kktd.api import Services
from kktd.app import Assembled
from kktd.store import Store

log = logging.getLogger("kktd.test_faults")

WEDGES = web.AppKey("test_wedges", list)


async def wedge_writer(store: Store) -> asyncio.Task[Any]:
    """Occupy the writer with a job that never ends; returns once the writer is inside it."""
    entered = asyncio.Event()

    async def forever(_conn: Any) -> None:
        entered.set()
        await asyncio.Event().wait()

    task = asyncio.ensure_future(store.run(forever))
    await entered.wait()
    return task


def add_fault_routes(app: web.Application, services: Services) -> None:
    wedges: list[asyncio.Task[Any]] = []
    app[WEDGES] = wedges

    async def inject_fault(request: web.Request) -> web.Response:
        body = await request.json()
        fault = body.get("fault") if isinstance(body, dict) else None
        if fault == "wedge_writer":
            wedges.append(await wedge_writer(services.store))
        elif fault == "block_loop":
            # Blocking the loop on purpose is the fault: the watchdog must catch it.
            asyncio.get_running_loop().call_later(0.05, time.sleep, 3600)
        else:
            return web.json_response({"error": {"code": "invalid_value", "message": "unknown fault"}}, status=422)
        log.warning("test fault injected: %s", fault)
        return web.json_response({"fault": fault}, status=202)

    app.router.add_post("/v1/test/fault", inject_fault)


def add_integrity_probe(app: web.Application, store: Store) -> None:
    """Wrap the store's deferred integrity check (the daemon runs it after READY) to record its end."""
    checked: dict[str, Any] = {"finished": False, "damage": None}
    verify = store.verify_in_background

    async def verify_and_record() -> str | None:
        damage = await verify()
        checked.update(finished=True, damage=damage)
        return damage

    store.verify_in_background = verify_and_record  # type: ignore[method-assign]

    async def integrity(_request: web.Request) -> web.Response:
        return web.json_response(checked)

    app.router.add_get("/v1/test/integrity", integrity)


def with_faults(kktd: Assembled) -> None:
    add_fault_routes(kktd.web_app, kktd.services)
    add_integrity_probe(kktd.web_app, kktd.store)
    log.warning("test fault hooks are enabled (tests.faulty_kktd): never in production")


if __name__ == "__main__":
    sys.exit(cli.main(sys.argv[1:], extension=with_faults))
