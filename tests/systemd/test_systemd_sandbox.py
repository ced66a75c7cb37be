"""The disposable systemd itself, and the shipped unit's hardening around a probe process."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.support import http

from .conftest import CHECKOUT, VENV, require_prerequisites
from .kktd_unit import KktdUnit
from .systemd_sandbox import BOOT_TARGET, CONTAINER_NAME, Sandbox, boot

pytestmark = pytest.mark.systemd

NOTIFY_UNIT = """\
[Unit]
Description=trivial Type=notify unit proving the sandbox's service manager works
[Service]
Type=notify
ExecStart={python} -c "import sdnotify, time; \\
    sdnotify.SystemdNotifier().notify('READY=1\\\\nSTATUS=hello from the sandbox'); time.sleep(3600)"
"""


def test_sandbox_runs_systemd_as_pid_1_in_a_container(sandbox: Sandbox) -> None:
    assert sandbox.run(["cat", "/proc/1/comm"]).stdout.strip() == "systemd"
    detected = sandbox.run(["systemd-detect-virt", "--container"], check=False).stdout.strip()
    assert detected == "container-other"
    assert f"container={CONTAINER_NAME}" in sandbox.run(["cat", "/proc/1/environ"]).stdout.split("\0")
    assert sandbox.run(["systemctl", "is-active", BOOT_TARGET]).stdout.strip() == "active"
    # No gettys, no multi-user.target: only what the boot target pulls in.
    for unit in ("multi-user.target", "getty.target", "timers.target"):
        assert sandbox.systemctl("is-active", unit, check=False).stdout.strip() == "inactive"


def test_sandbox_writes_stay_inside_and_checkout_is_read_only(sandbox: Sandbox) -> None:
    marker = f"/etc/kktd-sandbox-marker-{os.getpid()}"
    sandbox.run(["touch", marker])
    assert not Path(marker).exists(), "a write inside the sandbox reached the host's /etc"
    assert sandbox.run(["test", "-x", f"{VENV}/bin/python"], check=False).returncode == 0
    denied = sandbox.run(["touch", f"{CHECKOUT}/.sandbox-write-probe"], check=False)
    assert denied.returncode != 0 and "Read-only file system" in denied.stderr
    assert "ro" in sandbox.run(["findmnt", "-n", "-o", "OPTIONS", "/proc/sys"]).stdout.split(",")


def test_trivial_notify_unit_becomes_active_only_after_ready(sandbox: Sandbox) -> None:
    unit = "kktd-test-notify.service"
    sandbox.write_file(f"/run/systemd/system/{unit}", NOTIFY_UNIT.format(python=VENV / "bin" / "python"))
    sandbox.systemctl("daemon-reload")
    try:
        sandbox.systemctl("start", unit)
        shown = sandbox.show(unit, "ActiveState", "SubState", "StatusText", "Type")
        assert shown == {
            "ActiveState": "active",
            "SubState": "running",
            "StatusText": "hello from the sandbox",
            "Type": "notify",
        }
    finally:
        sandbox.systemctl("stop", unit, check=False)
        sandbox.remove(f"/run/systemd/system/{unit}")
        sandbox.systemctl("daemon-reload")


def test_shipped_hardening_lets_a_probe_do_kktds_work_and_nothing_else(kktd: KktdUnit) -> None:
    probe = CHECKOUT / "tests" / "systemd" / "probe_service.py"
    kktd.dropin("50-probe", f"ExecStart=\nExecStart={VENV}/bin/python {probe}")
    kktd.systemctl("start", "kktd")
    assert kktd.show("ActiveState", "StatusText") == {"ActiveState": "active", "StatusText": "probe listening"}
    status, report = http("GET", f"{kktd.url}/probe")
    assert status == 200, report
    kktd_uid = int(kktd.sandbox.run(["id", "-u", "kktd"]).stdout)
    assert report["uid"] == report["euid"] == kktd_uid != 0
    assert report["state_directory"] == "/var/lib/kktd"
    assert report["state_dir_write"] == "written"
    # ProtectSystem=strict, ProtectHome=: nothing writable outside the state dir ...
    for directory, outcome in report["writes"].items():
        assert outcome in {"EROFS", "EACCES", "ENOENT"}, (directory, outcome)
    # ... but its own /tmp and /var/tmp (PrivateTmp=), which the rest of the system does not see.
    assert report["private_tmp"] == {"/tmp": "written", "/var/tmp": "written"}
    seen = kktd.sandbox.run(["find", "/tmp", "/var/tmp", "-maxdepth", "1", "-name", "kktd-probe-private-marker"]).stdout
    assert seen == "", f"PrivateTmp= leaked: {seen}"
    # MemoryDenyWriteExecute= does not break the C extensions, and aiohttp really uses its C parser.
    extensions = report["c_extensions"]
    assert all(path.endswith(".so") for name, path in extensions.items() if name != "aiohttp.HttpRequestParser")
    assert extensions["aiohttp.HttpRequestParser"] == "aiohttp._http_parser"
    assert report["sqlite"] == {"journal_mode": "wal", "rows": 1, "file_mode": "0o600"}
    mode = kktd.sandbox.run(["stat", "-c", "%a %U", "/var/lib/kktd"]).stdout.split()
    assert mode == ["700", "kktd"]


def test_sandbox_teardown_leaves_nothing_behind() -> None:
    require_prerequisites()
    box = boot(CHECKOUT)
    pid, hostdir, cgroup = box.pid, box.hostdir, box.cgroup
    processes = box.host_pids()
    assert pid in processes and len(processes) >= 2, processes  # PID 1 plus at least journald
    box.close()
    assert not hostdir.exists()
    assert not cgroup.exists()
    assert str(hostdir) not in Path("/proc/self/mountinfo").read_text()
    assert [p for p in processes if Path(f"/proc/{p}").exists()] == []
