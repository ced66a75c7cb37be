"""The Debian package: build it, install it with dpkg inside a disposable systemd, use it, purge it."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Iterator

import pytest

from kktd import __version__
from kktd.receipt import sample_receipt

from tests.support import free_port, http

from .conftest import CHECKOUT, require_prerequisites
from .systemd_sandbox import Sandbox, boot

pytestmark = [pytest.mark.systemd, pytest.mark.slow]

DEB_INSIDE = "/var/cache/kktd-test/kktd.deb"
NONINTERACTIVE = {"DEBIAN_FRONTEND": "noninteractive"}


@pytest.fixture(scope="module")
def deb(tmp_path_factory: pytest.TempPathFactory) -> Path:
    require_prerequisites()
    out = tmp_path_factory.mktemp("deb")
    built = subprocess.run([str(CHECKOUT / "packaging" / "build-deb.sh"), str(out)],
                           capture_output=True, text=True, timeout=600)
    assert built.returncode == 0, built.stderr[-4000:]
    debs = list(out.glob("kktd_*.deb"))
    assert [d.name for d in debs] == [f"kktd_{__version__}_amd64.deb"]
    return debs[0]


@pytest.fixture(scope="module")
def package_sandbox() -> Iterator[Sandbox]:
    """A sandbox of its own: nothing of the checkout-based unit tests (/etc units, drop-ins) in it."""
    require_prerequisites()
    box = boot(CHECKOUT)
    try:
        yield box
    finally:
        box.close()


def test_deb_installs_starts_serves_and_purge_keeps_receipts(deb: Path, package_sandbox: Sandbox) -> None:
    box = package_sandbox
    port, ofd_port = free_port(), free_port()
    box.write_file(DEB_INSIDE, deb.read_bytes())
    # The operator's way to change settings without touching the conffile; the sandbox shares the host's
    # network, so the default port 8731 may be taken. Nothing listens on the OFD port: receipts stay pending.
    environment = f"KKTD_LISTEN=127.0.0.1:{port} KKTD_OFD_URL=http://127.0.0.1:{ofd_port}"
    box.write_file("/etc/systemd/system/kktd.service.d/10-test-port.conf",
                   f"[Service]\nEnvironment={environment}\n")

    box.run(["dpkg", "-i", DEB_INSIDE], env=NONINTERACTIVE, timeout=300)

    assert box.systemctl("is-enabled", "kktd").stdout.strip() == "enabled"
    assert box.systemctl("is-active", "kktd").stdout.strip() == "active"
    shipped = (CHECKOUT / "systemd" / "kktd.service").read_text()
    assert box.read_file("/lib/systemd/system/kktd.service") == shipped
    main_pid = box.show("kktd", "MainPID")["MainPID"]
    cmdline = box.run(["cat", f"/proc/{main_pid}/cmdline"]).stdout.split("\0")
    assert "/opt/kktd/venv/bin/kktd" in cmdline and "serve" in cmdline, cmdline
    assert box.run(["/usr/bin/kktd", "--version"]).stdout.strip() == f"kktd {__version__}"
    assert box.run(["kktd", "check-config"]).returncode == 0  # the shipped kktd.toml is valid as is

    status, created = http("POST", f"http://127.0.0.1:{port}/v1/kkt/receipt", sample_receipt("deb-0001"))
    assert status == 201, created
    status, stored = http("GET", f"http://127.0.0.1:{port}/v1/kkt/receipt/{created['receipt_id']}")
    assert (status, stored["status"], stored["idempotency_key"]) == (200, "pending", "deb-0001")

    purged = box.run(["dpkg", "--purge", "kktd"], env=NONINTERACTIVE, timeout=300)
    assert "purge keeps /var/lib/kktd" in purged.stderr
    assert box.systemctl("is-active", "kktd", check=False).stdout.strip() == "inactive"
    for gone in ("/lib/systemd/system/kktd.service", "/opt/kktd", "/usr/bin/kktd", "/etc/kktd/kktd.toml"):
        assert box.run(["test", "-e", gone], check=False).returncode != 0, f"{gone} left after purge"
    # Fiscal data survives a purge, still owned by the (kept) kktd user.
    owner = box.run(["stat", "-c", "%U %a", "/var/lib/kktd/buffer.db"]).stdout.split()
    assert owner == ["kktd", "600"]
