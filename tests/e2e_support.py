"""What the end-to-end tests of an upstream share: post receipts to a kktd process and read its answers."""

from __future__ import annotations

import asyncio
import json
import urllib.error
import urllib.request
from typing import Any

from tests.support import KktdProcess, post_many, wait_until

DRAIN_TIMEOUT_S = 90.0


def post(kktd: KktdProcess, bodies: list[dict[str, Any]]) -> dict[str, str]:
    """Post the receipts; every one must be acknowledged. Returns idempotency key -> receipt id."""
    answers = asyncio.run(post_many(kktd.url, bodies, concurrency=8))
    assert sorted(a.status for a in answers) == [201] * len(bodies), [a for a in answers if a.status != 201][:3]
    return {a.key: a.body["receipt_id"] for a in answers}


def get(kktd: KktdProcess, path: str) -> Any:
    """The JSON answer of GET path (text for another content type, e.g. /metrics)."""
    if kktd.notify is not None:
        # Read what kktd told "systemd": a full notify queue blocks kktd's sd_notify, and with it kktd.
        kktd.notify.collect()
    with urllib.request.urlopen(kktd.url + path, timeout=10) as response:
        body = response.read()
        return json.loads(body) if response.headers.get_content_type() == "application/json" else body.decode()


def health(kktd: KktdProcess) -> Any:
    try:
        return get(kktd, "/v1/health")
    except urllib.error.HTTPError as error:  # 503 answers carry the body too
        return json.loads(error.read())


def counts(kktd: KktdProcess) -> dict[str, int]:
    return dict(get(kktd, "/v1/kkt/buffer/status")["counts"])


def wait_all_sent(kktd: KktdProcess, expected: int, timeout: float = DRAIN_TIMEOUT_S) -> None:
    """Every receipt sent, none pending or awaiting a result; a dead letter fails at once."""

    def done() -> bool:
        now = counts(kktd)
        assert now["failed"] == 0, (now, kktd.log()[-3000:])
        return now["sent"] == expected and now["pending"] == 0 and now["submitted"] == 0

    try:
        wait_until(done, timeout, f"{expected} receipts sent", interval=0.1)
    except AssertionError:
        raise AssertionError(f"{counts(kktd)}\n{kktd.log()[-4000:]}") from None
