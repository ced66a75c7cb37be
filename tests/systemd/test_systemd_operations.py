"""Operating kktd.service: a receipt's story in the journal (native protocol, structured fields), and
`systemctl reload` of a loaded kktd, inside a disposable systemd."""

from __future__ import annotations

import json

import pytest

from tests.support import http, wait_until

from .kktd_unit import KktdUnit, Load
from .systemd_sandbox import SandboxError
from .test_systemd_kktd import (
    ACKED_BEFORE_ACTION,
    LOAD_MAX,
    LOAD_WORKERS,
    assert_all_stored,
    deliver_everything,
    record,
)

pytestmark = pytest.mark.systemd


def story(kktd: KktdUnit, receipt_id: str) -> list[dict[str, object]]:
    """What `journalctl -u kktd RECEIPT_ID=<id>` shows."""
    return kktd.journal(f"RECEIPT_ID={receipt_id}")


def messages(entries: list[dict[str, object]]) -> list[str]:
    return [str(e["MESSAGE"]) for e in entries]


def test_journalctl_receipt_id_shows_a_receipts_whole_story(kktd: KktdUnit) -> None:
    kktd.start_mock_ofd("error500")
    kktd.systemctl("start", "kktd")
    code, body = kktd.post_receipt("story-ok")
    assert code == 201, body
    delivered = body["receipt_id"]
    # Delivery attempts fail (HTTP 500) until the OFD recovers; each attempt is in the story.
    wait_until(
        lambda: any("failed: http_500" in m for m in messages(story(kktd, delivered))),
        30,
        "a failed delivery attempt in the journal",
        interval=0.1,
        error=SandboxError,
    )
    status, _ = http("POST", f"{kktd.ofd_admin_url}/admin/reject", {"pos_ids": ["POS-REFUSED"]})
    assert status == 200
    kktd.set_ofd_mode("online")
    wait_until(
        lambda: kktd.get_receipt(delivered)[1]["status"] == "sent",
        30,
        "the receipt sent",
        interval=0.1,
        error=SandboxError,
    )
    code, body = http("POST", f"{kktd.url}/v1/kkt/receipt", {**_receipt("story-refused"), "pos_id": "POS-REFUSED"})
    assert code == 201, body
    refused = body["receipt_id"]
    wait_until(
        lambda: kktd.get_receipt(refused)[1]["status"] == "failed",
        30,
        "the refused receipt dead-lettered",
        interval=0.1,
        error=SandboxError,
    )

    told = story(kktd, delivered)
    lines = messages(told)
    assert lines[0] == f"accepted {delivered}", lines
    assert any(line == "delivery of 1 receipts to kktd-ofd failed: http_500" for line in lines), lines
    assert lines[-1] == "1 receipts fiscalized by kktd-ofd", lines
    first, failed, last = told[0], next(e for e in told if "failed" in str(e["MESSAGE"])), told[-1]
    assert first["IDEMPOTENCY_KEY"] == "story-ok" and first["PRIORITY"] == "6"
    assert failed["UPSTREAM"] == "kktd-ofd" and failed["UPSTREAM_STATUS"] == "http_500"
    assert last["UPSTREAM_STATUS"] == "fiscalized"
    for entry in told:
        assert entry["_SYSTEMD_UNIT"] == "kktd.service" and entry["_TRANSPORT"] == "journal"
        assert str(entry["CODE_FILE"]).endswith(".py") and int(str(entry["CODE_LINE"])) > 0

    told = story(kktd, refused)
    assert messages(told)[0] == f"accepted {refused}"
    dead = told[-1]
    assert "rejected by the upstream" in str(dead["MESSAGE"]) and dead["PRIORITY"] == "4"
    assert dead["ERROR_CODE"] and dead["UPSTREAM_STATUS"] == "refused"

    # Receipt contents never reach the journal.
    everything = json.dumps(kktd.journal(), ensure_ascii=False)
    for content in ("Молоко", "Хлеб", "usn_income", "electronic"):
        assert content not in everything, content


def _receipt(key: str) -> dict[str, object]:
    from kktd.receipt import sample_receipt

    return sample_receipt(key)


def test_reload_of_a_loaded_kktd_loses_nothing(kktd: KktdUnit) -> None:
    kktd.sandbox.write_file("/etc/kktd/kktd.toml", 'pending_warn_age = "1h"\nmax_attempts = 20\n')
    kktd.start_mock_ofd("offline")
    kktd.systemctl("start", "kktd")
    main_pid = kktd.main_pid()
    with Load(kktd.url, "reload", LOAD_WORKERS, LOAD_MAX) as load:
        load.wait_acked(ACKED_BEFORE_ACTION)
        kktd.sandbox.write_file(
            "/etc/kktd/kktd.toml", 'pending_warn_age = "2h"\nmax_attempts = 30\nlisten = "127.0.0.1:1"\n'
        )
        kktd.systemctl("reload", "kktd")  # returns once kktd sent READY=1 after RELOADING=1
        reloaded_at = load.acked_count()
        kktd.sandbox.write_file("/etc/kktd/kktd.toml", "max_attempts = -5\n")
        kktd.systemctl("reload", "kktd")
        load.wait_acked(reloaded_at + ACKED_BEFORE_ACTION)
        result = load.stop(finish_within=30)
    record("reload during load", result)
    assert result.unfinished == [] and result.connection_errors == 0
    assert set(result.statuses) == {201}
    assert kktd.main_pid() == main_pid and kktd.show("ActiveState", "NRestarts") == {
        "ActiveState": "active",
        "NRestarts": "0",
    }
    text = kktd.journal_text()
    assert "reload: pending_warn_age: 3600 -> 7200" in text
    assert "reload: max_attempts: 20 -> 30" in text
    # KKTD_LISTEN (the test drop-in's environment) outranks the file: listen does not change at all.
    assert "reload: listen" not in text
    assert "configuration reloaded: 2 applied, 0 need a restart" in text
    refusal = [e for e in kktd.journal() if "reload refused" in str(e["MESSAGE"])]
    assert len(refusal) == 1 and refusal[0]["PRIORITY"] == "3" and refusal[0]["ERROR_CODE"] == "invalid_config"
    assert "max_attempts (from /etc/kktd/kktd.toml) = -5" in str(refusal[0]["MESSAGE"])
    assert_all_stored(kktd, result.acked, status="pending")
    deliver_everything(kktd, len(result.acked))
