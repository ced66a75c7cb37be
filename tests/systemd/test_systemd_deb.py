"""The Debian package: built with dpkg-buildpackage, checked by lintian, and taken through a till's life
cycle with apt-get inside disposable systemds: fresh install, upgrade under load with pending receipts,
downgrade onto a newer schema, remove and purge with and without undelivered receipts."""

from __future__ import annotations

import argparse
import re
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from kktd import __version__
from kktd.cli import build_parser
from kktd.receipt import sample_receipt
from tests.support import http, wait_until

from .conftest import CHECKOUT, SUMMARY, require_prerequisites
from .kktd_package import (
    CONFFILE,
    CONFFILE_ADDITION,
    VENV_INSIDE,
    Builds,
    PackagedKktd,
    build_packages,
    control_field,
    host_run,
    package_files,
)
from .kktd_unit import Load
from .systemd_sandbox import Sandbox, SandboxError, boot

pytestmark = [pytest.mark.systemd, pytest.mark.slow]

STATE = "/var/lib/kktd"
DB = f"{STATE}/buffer.db"
MAX_EXPOSURE = 1.5
REJECTED_POS = "POS-REJECTED"
UPGRADE_LOAD_MAX = 12000
# Commands an operator runs on the till; each must exit 0 against the freshly installed kktd.
OPERATOR_COMMANDS: list[list[str]] = [
    ["kktd", "check-config"],  # the shipped kktd.toml is valid as is
    ["kktd", "status"],  # the operator CLI answers from the running daemon (exit 0: all well)
]


@pytest.fixture(scope="module")
def builds(tmp_path_factory: pytest.TempPathFactory) -> Builds:
    require_prerequisites()
    built = build_packages(tmp_path_factory.mktemp("deb"))
    assert re.fullmatch(rf"kktd_{re.escape(__version__)}-\d+_amd64\.deb", built.first.deb.name), built.first
    SUMMARY.append(
        f"deb: {built.first.deb.name} {built.first.deb.stat().st_size / 1024:.0f} KiB, "
        f"Installed-Size {control_field(built.first.deb, 'Installed-Size')} KiB, "
        f"built in {built.first.seconds:.1f}s (second build {built.second.seconds:.1f}s)"
    )
    return built


@pytest.fixture
def package() -> Iterator[PackagedKktd]:
    """A fresh sandbox per test: each one takes the package through its own life cycle."""
    require_prerequisites()
    box = boot(CHECKOUT)
    try:
        packaged = PackagedKktd(box)
        packaged.prepare()
        yield packaged
    finally:
        box.close()


def lintian_tags(deb: Path) -> list[str]:
    """Debian 12's lintian, every tag shown; it exits non-zero on any error or warning."""
    out = host_run(["lintian", "--fail-on", "error,warning", "--pedantic", "-I", str(deb)]).stdout
    return [line for line in out.splitlines() if re.match(r"[EWIPXCO]: ", line)]


def test_lintian_is_clean_and_two_builds_of_one_commit_ship_the_same_files(builds: Builds) -> None:
    for build in (builds.second, builds.first):
        tags = lintian_tags(build.deb)
        # Overridden tags carry their reason in debian/kktd.lintian-overrides and are not shown.
        assert not [t for t in tags if t[0] in "EW"], tags
    severities = {s: sum(t.startswith(s) for t in tags) for s in "EWIP"}  # of the first build
    SUMMARY.append("lintian --pedantic -I: " + " ".join(f"{s}={n}" for s, n in severities.items()))

    first, second = package_files(builds.first.deb), package_files(builds.second.deb)
    assert sorted(first) == sorted(second)
    differing = sorted(path for path in first if first[path] != second[path])
    # Only what the second upload changed on purpose: its changelog and the conffile.
    assert differing == [f"./{CONFFILE}", "./usr/share/doc/kktd/changelog.Debian.gz"], differing
    python_files = [p for p in first if p.endswith(".py")]
    assert any(p.endswith("/site-packages/kktd/cli.py") for p in python_files)
    assert not [p for p in first if "__pycache__" in p or p.endswith(".pyc")]
    assert not [p for p in first if p.startswith("./opt/")]


def test_fresh_install_serves_and_purge_keeps_pending_receipts(builds: Builds, package: PackagedKktd) -> None:
    box = package.sandbox
    # Nothing listens on the OFD port: receipts stay pending.
    began = time.monotonic()
    package.install_package(builds.first.deb)
    status, created = poll_until_answered(package, "deb-0001")
    to_first_201 = time.monotonic() - began
    SUMMARY.append(f"deb: apt-get install to the first 201: {to_first_201:.2f}s")
    assert status == 201, created

    assert box.systemctl("is-enabled", "kktd").stdout.strip() == "enabled"
    assert box.systemctl("is-active", "kktd").stdout.strip() == "active"
    shipped = (CHECKOUT / "systemd" / "kktd.service").read_text()
    assert box.read_file("/lib/systemd/system/kktd.service") == shipped
    cmdline = box.run(["cat", f"/proc/{package.main_pid()}/cmdline"]).stdout.split("\0")
    assert f"{VENV_INSIDE}/bin/kktd" in cmdline and "serve" in cmdline, cmdline
    assert box.run(["/usr/bin/kktd", "--version"]).stdout.strip() == f"kktd {__version__}"
    for command in OPERATOR_COMMANDS:
        done = box.run(command, env=package.operator_env(), check=False)
        assert done.returncode == 0, (command, done.stdout, done.stderr)

    # The system user, created by the package (systemd-sysusers), with the state directory as its home.
    user = box.run(["getent", "passwd", "kktd"]).stdout.strip().split(":")
    assert int(user[2]) < 1000 and user[5] == STATE and user[6].endswith("nologin"), user
    assert box.show("kktd", "User")["User"] == "kktd"

    status, stored = package.get_receipt(str(created["receipt_id"]))
    assert (status, stored["status"], stored["idempotency_key"]) == (200, "pending", "deb-0001")
    assert package.sqlite(DB, f"SELECT status FROM receipts WHERE receipt_id = '{created['receipt_id']}'") == "pending"
    assert f"receipt {created['receipt_id']} accepted" in package.journal_text()

    # Bytecode: none shipped, compiled by postinst, readable by kktd (it may not write below /usr).
    assert "__pycache__" not in box.run(["dpkg", "-L", "kktd"]).stdout
    compiled = box.run(["find", VENV_INSIDE, "-name", "*.pyc", "-perm", "-0444"]).stdout.split()
    assert any("/site-packages/kktd/__pycache__/" in path for path in compiled)
    assert_man_page_matches_the_parser(box)
    assert_monitoring_files_installed(box)
    exposure = package.exposure()
    SUMMARY.append(f"deb: systemd-analyze security kktd (installed): {exposure}")
    assert exposure <= MAX_EXPOSURE

    # remove: kktd stops cleanly (it drained and exited 0), the receipts and the conffile stay.
    package.apt("remove", "kktd")
    assert package.exits() == ["success exited 0"]
    assert box.systemctl("is-active", "kktd", check=False).stdout.strip() == "inactive"
    assert package.exists(DB) and package.exists(f"/{CONFFILE}")
    assert not package.exists("/usr/lib/kktd"), "bytecode or files left in /usr/lib/kktd after remove"

    purged = said(package.apt("purge", "kktd"))
    assert "purge keeps /var/lib/kktd" in purged and "1 pending" in purged, purged
    assert box.systemctl("is-active", "kktd", check=False).stdout.strip() == "inactive"
    for gone in ("/lib/systemd/system/kktd.service", "/usr/lib/kktd", "/usr/bin/kktd", f"/{CONFFILE}", STATE):
        assert not package.exists(gone), f"{gone} left after purge"
    # Fiscal data survives a purge: moved aside under a dated name (named in the message), still owned by
    # the (kept) kktd user, with the receipt in it.
    [kept] = package.kept_state_dirs()
    assert kept in purged
    owner = box.run(["stat", "-c", "%U %a", f"{kept}/buffer.db"]).stdout.split()
    assert owner == ["kktd", "600"]
    assert package.sqlite(f"{kept}/buffer.db", "SELECT idempotency_key FROM receipts") == "deb-0001"


def test_upgrade_under_load_restarts_once_and_keeps_every_receipt(builds: Builds, package: PackagedKktd) -> None:
    box = package.sandbox
    package.start_mock_ofd("offline")  # receipts pile up as pending while the package is upgraded
    package.install_package(builds.first.deb)
    # The operator's local edit of the conffile (a valid setting).
    box.run(["sh", "-c", f"echo 'max_pending = 150000' >> /{CONFFILE}"])
    local_config = box.read_file(f"/{CONFFILE}")
    old_pid = package.main_pid()
    schema_before = package.sqlite(DB, "PRAGMA user_version")
    exits_before = len(package.exits())

    # Bounded, but enough receipts that the clients are still posting when the upgrade is over.
    with Load(package.url, "upgrade", workers=2, max_receipts=UPGRADE_LOAD_MAX) as load:
        load.wait_acked(150)
        package.install_package(builds.second.deb)
        upgraded_at = load.acked_count()
        assert upgraded_at + 100 <= UPGRADE_LOAD_MAX, "the load ended before the upgrade did"
        load.wait_acked(upgraded_at + 100)  # intake goes on with the new version
        result = load.stop(finish_within=30)

    assert result.unfinished == [] and result.acked, result
    assert control_field_installed(package) == builds.second.version
    # One restart: the old kktd stopped once, cleanly (no stop in prerm plus a restart in postinst).
    assert package.exits()[exits_before:] == ["success exited 0"]
    new_pid = package.main_pid()
    assert new_pid not in (0, old_pid)
    shown = package.show(
        "NRestarts",
        "ActiveState",
        "ActiveEnterTimestampMonotonic",
        "InactiveEnterTimestampMonotonic",
        "ActiveExitTimestampMonotonic",
    )
    assert (shown["NRestarts"], shown["ActiveState"]) == ("0", "active"), shown
    ready = [e for e in package.journal() if "ready: listening on" in str(e.get("MESSAGE"))]
    assert len(ready) == 2, ready  # the install's start and the upgrade's one restart
    left, back = int(shown["ActiveExitTimestampMonotonic"]), int(shown["ActiveEnterTimestampMonotonic"])
    restart_s = (back - left) / 1e6
    SUMMARY.append(
        f"deb: upgrade restart (active -> active) {restart_s:.2f}s; load: acknowledged "
        f"{upgraded_at} by the end of apt-get, {len(result.acked)} in all, "
        f"connection_errors={result.connection_errors}"
    )

    # The conffile the Debian way: the local edit is kept, the new version's file beside it.
    assert box.read_file(f"/{CONFFILE}") == local_config
    new_config = (builds.second.source / "systemd" / "kktd.toml").read_text()
    assert CONFFILE_ADDITION in new_config
    assert box.read_file(f"/{CONFFILE}.dpkg-dist") == new_config
    assert package.sqlite(DB, "PRAGMA user_version") == schema_before != "0"

    # Every acknowledged receipt is there, once; delivered, the OFD holds each exactly once.
    for key, receipt_id in result.acked.items():
        status, body = package.get_receipt(receipt_id)
        assert (status, body["idempotency_key"], body["status"]) == (200, key, "pending"), body
    assert package.buffer_counts() == {
        "pending": len(result.acked),
        "submitted": 0,
        "sent": 0,
        "failed": 0,
        "resolved": 0,
    }
    package.set_ofd_mode("online")
    expected = {"pending": 0, "submitted": 0, "sent": len(result.acked), "failed": 0, "resolved": 0}
    wait_until(
        lambda: package.buffer_counts() == expected, 120, "every receipt delivered", interval=0.1, error=SandboxError
    )
    assert package.ofd_stats()["unique"] == len(result.acked)

    # Everything was delivered: purge may remove the buffer.
    purged = said(package.apt("purge", "kktd"))
    assert "purge removed /var/lib/kktd" in purged, purged
    assert not package.exists(STATE) and package.kept_state_dirs() == []


def test_downgrade_onto_a_newer_schema_refuses_without_a_restart_loop(builds: Builds, package: PackagedKktd) -> None:
    package.start_mock_ofd("online")
    status, body = http("POST", f"{package.ofd_admin_url}/admin/reject", {"pos_ids": [REJECTED_POS]})
    assert status == 200, body
    package.install_package(builds.second.deb)
    assert package.post_receipt("downgrade-sent")[0] == 201
    rejected = sample_receipt("downgrade-dead", REJECTED_POS)
    status, body = http("POST", f"{package.url}/v1/kkt/receipt", rejected)
    assert status == 201, body
    wait_until(
        lambda: package.buffer_counts() == {"pending": 0, "submitted": 0, "sent": 1, "failed": 1, "resolved": 0},
        60,
        "one receipt sent and one dead-lettered",
        interval=0.1,
        error=SandboxError,
    )

    # A newer kktd's database: the schema version above anything this code knows.
    package.systemctl("stop", "kktd")
    newer = int(package.sqlite(DB, "PRAGMA user_version")) + 1
    package.sqlite(DB, f"PRAGMA user_version = {newer}")
    package.install_package(builds.first.deb, "--allow-downgrades")
    assert control_field_installed(package) == builds.first.version

    # 74, and failed rather than activating/auto-restart: systemd will not start it again by itself.
    wait_until(
        lambda: package.show("ActiveState")["ActiveState"] == "failed",
        30,
        "kktd to settle as failed",
        interval=0.1,
        error=SandboxError,
    )
    shown = package.show("ExecMainStatus", "Result", "NRestarts", "ActiveState", "SubState")
    assert shown == {
        "ExecMainStatus": "74",
        "Result": "exit-code",
        "NRestarts": "0",
        "ActiveState": "failed",
        "SubState": "failed",
    }, shown
    assert package.exits()[-1] == "exit-code exited 74"
    assert f"has schema v{newer}, newer than this kktd" in package.journal_text()
    assert package.sqlite(DB, "PRAGMA user_version") == str(newer)  # untouched

    # A dead letter is undelivered too: purge keeps the buffer.
    purged = said(package.apt("purge", "kktd"))
    assert "purge keeps /var/lib/kktd" in purged and "1 dead-lettered" in purged, purged
    [kept] = package.kept_state_dirs()
    assert kept in purged and not package.exists(STATE)
    keys = package.sqlite(
        f"{kept}/buffer.db", "SELECT idempotency_key || ' ' || status FROM receipts ORDER BY seq"
    ).splitlines()
    assert keys == ["downgrade-sent sent", "downgrade-dead failed"], keys


# -- helpers -------------------------------------------------------------------------------------------


def said(done: subprocess.CompletedProcess[str]) -> str:
    """What apt-get printed: it passes the maintainer scripts' stderr on to its stdout."""
    return done.stdout + done.stderr


def poll_until_answered(package: PackagedKktd, key: str) -> tuple[int, dict[str, object]]:
    answer: list[tuple[int, dict[str, object]]] = []

    def answered() -> bool:
        try:
            answer.append(package.post_receipt(key))
        except OSError:
            return False
        return True

    wait_until(answered, 60, "kktd to answer its first receipt", interval=0.02, error=SandboxError)
    return answer[-1]


def control_field_installed(package: PackagedKktd) -> str:
    return package.sandbox.run(["dpkg-query", "-W", "-f=${Version}", "kktd"]).stdout.strip()


def assert_man_page_matches_the_parser(box: Sandbox) -> None:
    """kktd(8) is generated from the argument parser: every command and option of `--help` is in it."""
    page = box.run(["sh", "-c", "zcat /usr/share/man/man8/kktd.8.gz"]).stdout
    assert page.startswith('.TH KKTD "8"'), page[:200]
    parser = build_parser()
    subcommands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for name, subparser in subcommands.choices.items():
        assert name.replace("-", "\\-") in page, name
        if subparser.add_help:
            for action in subparser._actions:
                for option in action.option_strings:
                    assert option.replace("-", "\\-") in page, (name, option)


def assert_monitoring_files_installed(box: Sandbox) -> None:
    """The operations issue's dashboards and alert rules, when the tree has them (tests excluded)."""
    monitoring = CHECKOUT / "packaging" / "monitoring"
    files = [p for p in monitoring.rglob("*") if p.is_file()] if monitoring.is_dir() else []
    shipped = [p for p in files if "test" not in str(p.relative_to(monitoring))]
    for path in shipped:
        installed = box.read_file(f"/usr/share/kktd/{path.relative_to(monitoring)}")
        assert installed == path.read_text(), path
